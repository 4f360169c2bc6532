"""RL that learns: PPO, RLOO and GRPO each raise a known reward on a tiny model, at bounded KL.

The reward is a preference-model folder built by hand so that its score is a known function: it
grows with the share of "marker" tokens (a fixed quarter of the vocabulary, none of them in the chat
template or the prompts) in what it reads. It is an ordinary ``LlamaForSequenceClassification``
folder, loaded by ``RewardScorer.from_folder`` like the run's PM, so the loops are tested exactly as
they run, against a target whose optimum is known: answers made of marker tokens.

Measured over seeds 0-4 (30 steps, beta 0.1; the tests run seed 0): the held-out greedy reward starts
at 0.72 and rises by 0.55-1.07 (PPO), 0.35-0.56 (RLOO) and 0.30-0.58 (GRPO); the largest logged KL
was 20 nats per answer (PPO), 8 (RLOO) and 18 (GRPO). Each test takes 6-10 s on one CPU thread.
"""

from __future__ import annotations

import random

import pytest

from cai.config import GRPOConfig, PPOConfig, RLOOConfig, SamplingConfig
from cai.data import PromptRow
from cai.io import read_jsonl

MARGIN = 0.2
"""Smallest held-out reward gain accepted (from a start of 0.72; the smallest of 15 measured gains was 0.30)."""
MAX_KL = 30.0
"""Largest KL to the reference accepted, nats per 12-token answer (the largest measured was 20)."""
STEPS = 30

PROMPTS = [PromptRow(id=f"p{i}", messages=[{"role": "user", "content": f"question {i} about bread"}]) for i in range(16)]
HELD_OUT = [PromptRow(id=f"e{i}", messages=[{"role": "user", "content": f"tell me {i} things"}]) for i in range(8)]


@pytest.fixture(autouse=True)
def _one_thread():
    """A 32-wide model runs faster on one thread, and far faster on a CPU that other work shares."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_marker_pm(policy_dir, folder, marker_ids: list[int], *, gain: float = 2.0, scale: float = 5.0):
    """A sequence-classification folder scoring ``scale * a / sqrt(1 + a^2)``, ``a = gain * share``,
    where ``share`` is the fraction of marker tokens in the input.

    How: every weight is zero except these. Embeddings are one-hot: feature 0 for marker tokens,
    feature 1 for all others (so every row has the same norm and RMSNorm scales them alike). With
    zero query and key weights, layer 0's attention is a uniform average over the prefix; its value
    and output weights copy feature 0, so the last position holds ``a`` in feature 0 next to its own
    token's 1 in feature 1. Everything else adds nothing, the final RMSNorm divides by
    ``sqrt((a^2 + 1) / hidden)``, and the score head reads feature 0.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(policy_dir)
    config.num_labels = 1
    model = LlamaForSequenceClassification(config)
    hidden = config.hidden_size
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        embed = model.model.embed_tokens.weight
        embed[:, 1] = 1.0
        embed[marker_ids, 1] = 0.0
        embed[marker_ids, 0] = 1.0
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        attention = model.model.layers[0].self_attn
        attention.v_proj.weight[0, 0] = 1.0
        attention.o_proj.weight[0, 0] = gain / hidden ** 0.5  # RMSNorm made feature 0 sqrt(hidden) per marker
        model.model.norm.weight.fill_(1.0)
        model.score.weight[0, 0] = scale / hidden ** 0.5
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def marker_pm(tiny_model_dir, tmp_path_factory):
    """(PM folder, marker token ids): a random quarter of the tokens the template and prompts don't use."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    used = set(tokenizer.all_special_ids)
    for row in PROMPTS + HELD_OUT:
        chat = row.messages + [{"role": "assistant", "content": "x"}]
        used |= set(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False))
    free = [i for i in range(len(tokenizer)) if i not in used]
    marker = sorted(random.Random(0).sample(free, len(free) // 4))
    return make_marker_pm(tiny_model_dir, tmp_path_factory.mktemp("marker_pm"), marker), marker


def test_the_marker_pm_scores_the_share_of_marker_tokens(marker_pm, tiny_model_dir):
    from transformers import AutoTokenizer

    from cai.train.pm import RewardScorer

    folder, marker = marker_pm
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    scorer = RewardScorer.from_folder(folder)
    prompt = PROMPTS[0].messages
    plain = [i for i in range(len(tokenizer)) if i not in marker and i not in tokenizer.all_special_ids]
    answers = [tokenizer.decode(marker[:k] + plain[:12 - k]) for k in (0, 4, 8, 12)]
    scores = scorer.score([prompt] * 4, answers)
    assert scores == sorted(scores) and scores[-1] - scores[0] > 1.0


def assert_learned(start: float, end: float, kls: list[float]) -> None:
    assert end - start > MARGIN, f"held-out reward {start} -> {end}: less than +{MARGIN}"
    assert max(kls) < MAX_KL, f"KL to the reference reached {max(kls)} nats per answer"


def test_ppo_raises_the_reward_at_bounded_kl(marker_pm, tiny_model_dir, tmp_path):
    from cai.train.ppo import train_ppo

    config = PPOConfig(steps=STEPS, rollout_batch=16, minibatch=8, epochs=1, learning_rate=3e-3, kl_coef=0.1,
                       eval_every=1000, save_every=1000, sampling=SamplingConfig(max_new_tokens=12, temperature=1.0))
    metrics = train_ppo(PROMPTS, [], HELD_OUT, policy_spec=str(tiny_model_dir), pm_folder=marker_pm[0],
                        out_dir=tmp_path / "ppo", config=config, show_progress=False)
    kls = [r["kl"] for r in read_jsonl(tmp_path / "ppo" / "train_log.jsonl") if "kl" in r]
    assert_learned(metrics["eval_reward_start"], metrics["eval_reward_end"], kls)


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_rloo_and_grpo_raise_the_reward_at_bounded_kl(algo, marker_pm, tiny_model_dir, tmp_path):
    from cai.train.online_rl import train_online_rl

    config = (RLOOConfig if algo == "rloo" else GRPOConfig)(
        steps=STEPS, prompts_per_step=2, generations=8, max_new_tokens=12, learning_rate=3e-3, beta=0.1,
        eval_every=1000)
    metrics = train_online_rl(algo, PROMPTS, HELD_OUT, policy_spec=str(tiny_model_dir), pm_folder=marker_pm[0],
                              out_dir=tmp_path / algo, config=config, show_progress=False)
    kls = [r["kl"] for r in metrics["log"] if r.get("kl") is not None]
    assert len(kls) == STEPS
    assert_learned(metrics["eval_reward_start"], metrics["eval_reward_end"], kls)
