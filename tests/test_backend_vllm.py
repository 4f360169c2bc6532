"""The vLLM backend on a GPU: same greedy text and choice log-probs as the transformers backend."""

import pytest
import torch

from cai.backends.vllm import vllm_available

needs_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not vllm_available(), reason="needs a CUDA GPU and vLLM"),
]


@needs_gpu[0]
@needs_gpu[1]
def test_vllm_matches_hf(tiny_model_dir):
    from cai.backends.hf import HFBackend
    from cai.backends.vllm import VLLMBackend
    from cai.types import SamplingParams

    vllm = VLLMBackend.from_spec(str(tiny_model_dir), dtype="float32", gpu_memory_utilization=0.3)
    hf = HFBackend.from_spec(str(tiny_model_dir), dtype="float32")
    chats = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    params = SamplingParams(max_new_tokens=8)
    assert vllm.generate(chats, params) == hf.generate(chats, params)
    texts = [hf.render(c) for c in chats]
    a = torch.tensor(vllm.choice_logprobs(texts, [" (A)", " (B)"]))
    b = torch.tensor(hf.choice_logprobs(texts, [" (A)", " (B)"]))
    assert torch.allclose(a, b, atol=1e-3)


def test_missing_vllm_is_one_sentence(monkeypatch):
    import importlib.util

    from cai.backends.vllm import VLLMBackend
    from cai.errors import CaiError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CaiError, match="pip install 'cai\\[vllm\\]'"):
        VLLMBackend.from_spec("bundled")


def test_vllm_refuses_a_seed_list_of_the_wrong_length():
    """The shared per-row seed rule checks the list before vLLM is touched (so no vLLM is needed here)."""
    from types import SimpleNamespace

    from cai.backends.vllm import VLLMBackend
    from cai.errors import CaiError
    from cai.types import SamplingParams

    llm = SimpleNamespace(get_tokenizer=lambda: SimpleNamespace(chat_template=None),
                          llm_engine=SimpleNamespace(model_config=SimpleNamespace(max_model_len=64)))
    with pytest.raises(CaiError, match="got 1 seeds for 2 prompts"):
        VLLMBackend(llm).generate(["a", "b"], SamplingParams(temperature=1.0), seeds=[7])
