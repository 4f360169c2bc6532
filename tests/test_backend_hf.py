"""The transformers backend on a tiny model: exactness of generation and scoring, prefix reuse."""

from __future__ import annotations

import pytest
import torch

from cai.backends import prefix_attention
from cai.backends.base import Backend
from cai.backends.hf import HFBackend
from cai.backends.kv_cache import common_prefix_length
from cai.errors import CaiError
from cai.types import SamplingParams

SHARED = (
    "Human: How do I bake bread at home? Assistant: Mix flour, water, yeast and salt, knead, let it rise. "
    "Critique: The response is helpful and harmless. Revision: Here is a safe, simple way to bake bread. "
)
QUESTIONS = ["Which is less harmful?", "The quick brown fox", "Please rewrite the response", "0 1 2 3 4", "I can't"]


def chats(shared: str = SHARED):
    return [[{"role": "user", "content": shared + q}] for q in QUESTIONS]


@pytest.fixture()
def backend(tiny_backend):
    tiny_backend.prefix_cache.clear()
    tiny_backend.reuse_prefix = True
    tiny_backend.cascade = True
    tiny_backend.batch_size = 4
    tiny_backend.pack = True
    return tiny_backend


@pytest.fixture()
def split_calls(monkeypatch):
    """Counts calls of the split (shared-prefix) attention, so a test can see that cascade really ran."""
    calls = []
    real = prefix_attention.split_prefix_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(prefix_attention, "split_prefix_attention", counted)
    return calls


def reference_greedy(backend: HFBackend, chat, max_new_tokens: int) -> str:
    """Plain transformers generate on one unpadded prompt: the ground truth."""
    ids = torch.tensor([backend.encode([backend.render(chat)])[0]])
    out = backend.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=sorted(backend.eos_ids), pad_token_id=backend.pad_id,
    )
    return backend.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_is_a_backend(backend):
    assert isinstance(backend, Backend)


def test_greedy_matches_plain_transformers_generate(backend):
    params = SamplingParams(max_new_tokens=10)
    got = backend.generate(chats(), params)
    assert got == [reference_greedy(backend, c, 10) for c in chats()]
    assert len(set(got)) > 1  # the tiny model really does answer differently


@pytest.mark.parametrize("cascade", [False, True])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_prefix_reuse_gives_identical_greedy_text(backend, batch_size, cascade, split_calls):
    backend.batch_size = batch_size
    backend.cascade = cascade
    params = SamplingParams(max_new_tokens=12)
    backend.reuse_prefix = False
    plain = backend.generate(chats(), params)
    assert not split_calls  # no prefix, no cascade
    backend.reuse_prefix = True
    before = backend.stats["prefix_reused_tokens"]
    reused = backend.generate(chats(), params)
    assert reused == plain
    assert backend.stats["prefix_reused_tokens"] > before
    assert bool(split_calls) == cascade
    assert backend.model.config._attn_implementation == "sdpa"  # switched only inside each call


@pytest.mark.parametrize(("reuse_prefix", "cascade"), [(False, False), (True, False), (True, True)])
def test_identical_prompts_are_prefilled_once_with_the_same_samples(backend, reuse_prefix, cascade):
    """K samples of one prompt (or N votes on one question) prefill it once; each row still draws
    from its own seed exactly as it would alone."""
    backend.reuse_prefix = reuse_prefix
    backend.cascade = cascade
    backend.batch_size = 9  # one batch: rows split over two batches are prefilled once in each
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    prompts = [c for c in chats()[:3] for _ in range(3)]  # three prompts, three samples each
    seeds = list(range(100, 109))
    alone = [backend.generate([p], params, seeds=[s])[0] for p, s in zip(prompts, seeds)]
    prefilled, shared = backend.stats["prefill_tokens"], backend.stats["prefill_shared_rows"]
    together = backend.generate(prompts, params, seeds=seeds)
    assert together == alone
    assert backend.stats["prefill_shared_rows"] - shared == 6
    suffixes = [len(backend.encode([backend.render(c)])[0]) for c in chats()[:3]]
    # Prefilled: each distinct prompt once (less its cached prefix, when there is one).
    assert backend.stats["prefill_tokens"] - prefilled <= sum(suffixes)
    assert len(set(together)) > 3  # different seeds really sample differently


def test_prefix_cache_is_kept_across_calls(backend):
    params = SamplingParams(max_new_tokens=4)
    backend.generate(chats(), params)
    assert len(backend.prefix_cache.entries) == 1
    prefilled = backend.stats["prefill_tokens"]
    # A second call (even of one prompt) with the same prefix prefills only its own suffix.
    one = chats()[:1]
    backend.generate(one, params)
    suffix_len = len(backend.encode([backend.render(one[0])])[0]) - len(next(iter(backend.prefix_cache.entries)))
    assert backend.stats["prefill_tokens"] - prefilled == suffix_len


def test_longer_prefix_extends_the_cached_one(backend):
    """A new, longer shared prefix is prefilled from the cached shorter one: only the extra tokens."""
    base = list(range(10, 40))
    extra = list(range(50, 70))
    backend.min_prefix_tokens = 16
    backend._prefix_for([base + [1], base + [2]], allow_new=True)
    prefilled = backend.stats["prefill_tokens"]
    length, kv = backend._prefix_for([base + extra + [1], base + extra + [2]], allow_new=True)
    assert length == len(base + extra)
    assert backend.stats["prefill_tokens"] - prefilled == len(extra)
    backend.prefix_cache.clear()
    _, fresh = backend._prefix_for([base + extra + [1], base + extra + [2]], allow_new=True)
    for (k1, v1), (k2, v2) in zip(kv, fresh):
        assert torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)


def test_choice_logprobs_are_exact(backend):
    texts = [backend.render(c + [{"role": "assistant", "content": "The answer is:"}]) for c in chats()]
    options = [" (A)", " (B)", " Let's think"]
    got = backend.choice_logprobs(texts, options)
    model, tok = backend.model, backend.tokenizer
    for text, row in zip(texts, got):
        for option, value in zip(options, row):
            p = tok(text, add_special_tokens=False)["input_ids"]
            o = tok(option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = model(torch.tensor([p + o])).logits.log_softmax(-1)[0]
            expected = sum(lp[len(p) - 1 + k, o[k]].item() for k in range(len(o)))
            assert value == pytest.approx(expected, abs=1e-4)


def test_choice_logprobs_same_with_and_without_reuse(backend):
    texts = [backend.render(c) for c in chats()]
    backend.reuse_prefix = False
    plain = backend.choice_logprobs(texts, [" (A)", " (B)"])
    backend.reuse_prefix = True
    reused = backend.choice_logprobs(texts, [" (A)", " (B)"])
    assert torch.allclose(torch.tensor(plain), torch.tensor(reused), atol=1e-4)
    assert backend.prefix_cache.entries


def test_sampling_is_seeded_per_row_not_per_batch(backend):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    backend.batch_size = 5
    a = backend.generate(chats(), params)
    backend.batch_size = 1
    b = backend.generate(chats(), params)
    assert a == b
    c = backend.generate(chats(), SamplingParams(max_new_tokens=8, temperature=1.0, seed=8))
    assert c != a
    # Explicit per-row seeds: the same prompt twice with two seeds gives two samples.
    twice = backend.generate([chats()[0]] * 2, SamplingParams(max_new_tokens=8, temperature=1.5), seeds=[1, 2])
    assert twice[0] != twice[1]


def test_the_sampler_draws_each_row_from_its_own_distribution_and_generator(monkeypatch):
    """`HFBackend._sample` (inverse CDF, one uniform per row): frequencies match the probabilities,
    tokens of probability 0 never come up, and a row's draw depends on its generator only."""
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.25, 0.25, 0.25, 0.25]])
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    draws = torch.stack([HFBackend._sample(probs, generators) for _ in range(20000)])  # [draws, rows]
    for row in range(3):
        share = torch.bincount(draws[:, row], minlength=5).double() / len(draws)
        assert torch.allclose(share, probs[row].double(), atol=0.015), (row, share)
        assert (share[probs[row] == 0] == 0).all()
    first = torch.Generator().manual_seed(2)
    alone = [HFBackend._sample(probs[2:], [first])[0] for _ in range(50)]
    again = torch.Generator().manual_seed(2)
    in_a_batch = [HFBackend._sample(probs, [torch.Generator().manual_seed(9), torch.Generator().manual_seed(9), again])[2]
                  for _ in range(50)]
    assert [int(t) for t in alone] == [int(t) for t in in_a_batch]
    with pytest.raises(CaiError, match="not numbers"):  # a broken model's NaN logits: said, not sampled from
        HFBackend._sample(torch.tensor([[0.5, float("nan")]]), [torch.Generator()])
    # A uniform that rounds up to the total still lands on a token with probability.
    monkeypatch.setattr(torch, "rand", lambda *a, **kw: torch.ones((), dtype=torch.float64))
    assert int(HFBackend._sample(torch.tensor([[0.25, 0.75, 0.0]]), [torch.Generator()])[0]) == 1


def test_top_p_draws_from_the_nucleus_whether_it_ends_among_the_candidates_or_not(monkeypatch):
    """`HFBackend._sample_nucleus`: a row whose nucleus ends within its top candidates draws among them, one
    that does not sorts the whole vocabulary; both draw the nucleus in proportion, and a row's tokens do
    not depend on which way the other rows of its batch went."""
    probs = torch.tensor([[0.05, 0.6, 0.1, 0.25], [0.3, 0.3, 0.2, 0.2]])
    # top_p 0.8: row 0 keeps 0.6 and 0.25 (the nucleus ends within 2 candidates), row 1 keeps 0.3, 0.3, 0.2.
    want = torch.tensor([[0.0, 0.6, 0.0, 0.25], [0.3, 0.3, 0.2, 0.0]], dtype=torch.float64)
    want = want / want.sum(-1, keepdim=True)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    draws = torch.stack([HFBackend._sample_nucleus(probs, 0.8, generators, candidates=2) for _ in range(20000)])
    for row in range(2):
        share = torch.bincount(draws[:, row], minlength=4).double() / len(draws)
        assert torch.allclose(share, want[row], atol=0.015), (row, share)
    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **kw: sorts.append(1) or real_sort(*a, **kw))
    alone, batched = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    one = [int(HFBackend._sample_nucleus(probs[:1], 0.8, [alone], candidates=2)[0]) for _ in range(40)]
    assert not sorts  # row 0's nucleus (0.6 + 0.25) ends within its 2 candidates
    two = [int(HFBackend._sample_nucleus(probs, 0.8, [batched, torch.Generator()], candidates=2)[0]) for _ in range(40)]
    assert len(sorts) == 40  # row 1's does not: it sorts, row 0 still draws among its candidates
    assert one == two and set(one) == {1, 3}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_picks_the_tokens_generate_picks(backend, temperature):
    """The streaming path (one token per ask) samples a seeded row exactly as `generate` does."""
    params = SamplingParams(max_new_tokens=6, temperature=temperature)
    prompt_ids = backend.encode([backend.render(chats()[0])])[0]
    (expected,) = backend.generate_tokens([chats()[0]], params, seeds=[11])
    steps = list(backend.stream(prompt_ids).tokens(params, seed=11))
    streamed = [s[0] for s in steps if s is not None]
    assert streamed == expected.token_ids
    assert (steps[-1] is None) == (expected.end_token is not None)
    assert all(torch.allclose(lp.exp().sum(), torch.tensor(1.0)) for _, lp in filter(None, steps))
    scored = backend.stream(prompt_ids, score_prompt=True)
    assert scored.prompt_logits.shape[0] == len(prompt_ids)
    assert backend.stream(prompt_ids).prompt_logits is None


def test_stop_strings_cut_the_output(backend):
    params = SamplingParams(max_new_tokens=16)
    full = backend.generate(chats(), params)
    # Stop on a piece of the first answer: that answer must end right before it.
    stop = full[0][3:6]
    assert stop
    cut = backend.generate(chats(), SamplingParams(max_new_tokens=16, stop=(stop,)))
    assert cut[0] == full[0][: full[0].find(stop)]
    for whole, part in zip(full, cut):
        assert whole.startswith(part)
        assert stop not in part


def test_max_new_tokens_is_respected(backend):
    before = backend.stats["generated_tokens"]
    short = backend.generate(chats(), SamplingParams(max_new_tokens=3))
    assert backend.stats["generated_tokens"] - before <= 3 * len(short)
    longer = backend.generate(chats(), SamplingParams(max_new_tokens=8))
    assert all(b.startswith(a.rstrip("\ufffd")) for a, b in zip(short, longer))


def test_assistant_last_message_is_continued(backend):
    chat = [{"role": "user", "content": "Pick one."}, {"role": "assistant", "content": "The answer is:"}]
    text = backend.render(chat)
    assert text.endswith("The answer is:")
    assert backend.render(chat[:1]).endswith("<|im_start|>assistant\n")


def test_oversized_and_empty_prompts_are_clear_errors(backend):
    with pytest.raises(CaiError, match="exceeds the model's context"):
        backend.generate(["word " * 9000], SamplingParams(max_new_tokens=4))
    with pytest.raises(CaiError, match="prompt 0 is empty"):
        backend.generate([""], SamplingParams())
    with pytest.raises(CaiError, match="at least one option"):
        backend.choice_logprobs(["x"], [])


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5], [6]]) == 0
    assert common_prefix_length([]) == 0


def test_bad_sampling_params():
    with pytest.raises(CaiError):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(CaiError):
        SamplingParams(temperature=-1)
    with pytest.raises(CaiError):
        SamplingParams(top_p=0)


def _metaspace_backend():
    """A tiny llama with a SentencePiece-style tokenizer (spaces as "▁", one prepended), as Llama-2/Mistral use."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from cai.backends.hf import HFBackend
    from cai.testing import _CORPUS, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # As in Llama-2's tokenizer.json: spaces become "▁" and one "▁" is prepended; pieces start at a "▁".
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIAL_TOKENS],
                                                                         show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=fast.pad_token_id))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return HFBackend(model.eval(), fast, batch_size=2, min_prefix_tokens=4)


def test_choice_scores_use_the_prompt_plus_option_tokenisation_with_sentencepiece():
    """With a Metaspace tokenizer " (A)" alone starts with an extra "▁"; scoring must read the tokens the
    model sees in prompt + option, computed here by one plain forward pass over that text."""
    import torch

    backend = _metaspace_backend()
    tok = backend.tokenizer
    prompts = ["Which of these responses is less harmful? The answer is:", "Let's think step by step. The answer is:"]
    options = [" (A)", " (B)"]
    alone = tok(" (A)", add_special_tokens=False)["input_ids"]
    joined = tok(prompts[0] + " (A)", add_special_tokens=False)["input_ids"]
    head = tok(prompts[0], add_special_tokens=False)["input_ids"]
    assert joined[: len(head)] == head and joined[len(head):] != alone  # the case the old joining got wrong
    expected = []
    with torch.no_grad():
        for p in prompts:
            row = []
            for o in options:
                ids = tok(p + o, add_special_tokens=False)["input_ids"]
                n = len(tok(p, add_special_tokens=False)["input_ids"])
                logp = backend.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
                row.append(sum(float(logp[t - 1, ids[t]]) for t in range(n, len(ids))))
            expected.append(row)
    got = backend.choice_logprobs(prompts, options)
    assert [v for row in got for v in row] == pytest.approx([v for row in expected for v in row], abs=1e-4)


# ------------------------------------------------------------------ shared-prefix (cascade) attention


def _left_padded_causal(lengths: list[int], width: int, past: int) -> torch.Tensor:
    """``[b, 1, t, past + width]`` bool: row r's last ``lengths[r]`` of ``past + width`` suffix keys are real,
    and query i (of the last ``width``) sees keys up to its own position."""
    keys = past + width
    real = torch.arange(keys)[None] >= keys - torch.tensor(lengths)[:, None]  # [b, keys]
    causal = torch.arange(keys)[None] <= (past + torch.arange(width))[:, None]  # [t, keys]
    return (real[:, None, None, :] & causal[None, None]).contiguous()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(("t", "past"), [(1, 6), (3, 4), (6, 0)])
def test_split_prefix_attention_is_one_softmax_over_prefix_and_suffix(t, past, fused, monkeypatch):
    """The split form equals SDPA over [prefix expanded to every row; suffix], GQA and left padding
    included, even for padding queries that see no suffix key at all; with the fused CPU kernel and
    with the matmul form."""
    monkeypatch.setattr(prefix_attention, "FUSED_CPU", fused)
    torch.manual_seed(0)
    b, h, kvh, d, p = 3, 6, 2, 8, 7
    q = torch.randn(b, h, t, d)
    pk, pv = torch.randn(1, kvh, p, d), torch.randn(1, kvh, p, d)
    k, v = torch.randn(b, kvh, past + t, d), torch.randn(b, kvh, past + t, d)
    visible = _left_padded_causal([past + t, past + 1, max(past - 1, 1)], t, past)
    if past == 0:
        assert not visible[1, 0, 0].any()  # a padding query that sees no suffix key
    got = prefix_attention.split_prefix_attention(q, pk, pv, k, v, visible, d ** -0.5)
    joined_k = torch.cat([pk.expand(b, -1, -1, -1), k], 2).repeat_interleave(h // kvh, 1)
    joined_v = torch.cat([pv.expand(b, -1, -1, -1), v], 2).repeat_interleave(h // kvh, 1)
    mask = torch.cat([torch.ones(b, 1, t, p, dtype=torch.bool), visible], -1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, joined_k, joined_v, attn_mask=mask)
    assert torch.allclose(got, expected, atol=1e-5)


@torch.inference_mode()  # as the backend runs (prefix K/V are inference tensors)
def _decode_logits(backend: HFBackend, rows: list[list[int]], steps: int) -> tuple[list[torch.Tensor], bool]:
    """Logits of a prefill and ``steps`` greedy decoding steps through the backend's own batch
    pieces, the first row leaving the batch after the first step; and whether cascade ran."""
    prefix_len, prefix_kv = backend._prefix_for(rows, allow_new=True)
    assert prefix_len > 0
    ids, mask, positions, cache, shared = backend._batch_inputs(rows, prefix_len, prefix_kv, extra=steps)
    logits = backend._forward(shared, input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache).logits
    out, next_pos = [logits], positions[:, -1] + 1
    for step in range(steps):
        tokens = logits[:, -1].argmax(-1)
        if step == 1:
            keep = torch.arange(1, tokens.shape[0])
            cache.batch_select_indices(keep)
            mask, next_pos, tokens = mask[keep], next_pos[keep], tokens[keep]
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
        logits = backend._forward(shared, input_ids=tokens[:, None], attention_mask=mask,
                                  position_ids=next_pos[:, None], cache=cache).logits
        out.append(logits)
        next_pos = next_pos + 1
    return out, shared is not None


@pytest.mark.parametrize(("fused", "split_max_queries"), [(True, 0), (False, 0), (False, 10_000)])
def test_cascade_logits_match_the_prefix_copied_into_every_row(backend, monkeypatch, split_calls, fused,
                                                              split_max_queries):
    """Prefill (left padding, padding positions included) and decoding steps, with a row leaving the
    batch: the same logits whether the prefix is copied per row or stored once. Without the fused CPU
    kernel the prefill runs the joined SDPA form with ``split_max_queries=0`` and the split form with a
    large one; with it, always the split form."""
    monkeypatch.setattr(prefix_attention, "FUSED_CPU", fused)
    monkeypatch.setattr(prefix_attention, "SPLIT_MAX_QUERIES", split_max_queries)
    config = backend.model.config
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention is exercised
    rows = backend.encode([backend.render(c) for c in chats()])
    assert len(set(map(len, rows))) > 1  # left padding is exercised
    backend.cascade = False
    copied, used = _decode_logits(backend, rows, steps=4)
    assert not used
    backend.cascade = True
    shared, used = _decode_logits(backend, rows, steps=4)
    assert used
    prefilled_split = any(shape[2] > 1 for shape in split_calls)
    assert prefilled_split == (fused or split_max_queries > 0)
    for a, b in zip(copied, shared):
        assert torch.allclose(a, b, atol=1e-4)


def test_cascade_sampling_gives_the_same_text(backend, split_calls):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    prompts = chats() + chats()[:2]
    backend.batch_size = 5
    backend.cascade = False
    copied = backend.generate(prompts, params, seeds=list(range(len(prompts))))
    backend.cascade = True
    shared = backend.generate(prompts, params, seeds=list(range(len(prompts))))
    assert shared == copied and split_calls


def test_cascade_choice_scores_match_the_copied_prefix(backend, split_calls):
    """Option scoring: the first token from the prompt pass, the rest from a second pass on the cache
    repeated per option; with cascade only the suffixes are repeated."""
    texts = [backend.render(c + [{"role": "assistant", "content": "The answer is:"}]) for c in chats()]
    options = [" (A)", " (B)", " Let's think"]
    backend.cascade = False
    copied = backend.choice_logprobs(texts, options)
    assert not split_calls
    backend.cascade = True
    shared = backend.choice_logprobs(texts, options)
    assert split_calls and any(shape[2] > 1 for shape in split_calls)  # the options' tails went the split way
    # Float32 rounding only: these sums of log-probs reach ~70 nats here (and the cascade's sit closer
    # to a float64 run than the copied prefix's do).
    assert torch.allclose(torch.tensor(copied), torch.tensor(shared), rtol=1e-6, atol=1e-5)


def test_cascade_needs_full_attention_through_the_registry():
    from types import SimpleNamespace

    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**config), _supports_attention_backend=True)

    assert prefix_attention.supported(model(layer_types=["full_attention"] * 2))
    assert not prefix_attention.supported(model(layer_types=["full_attention", "sliding_attention"]))
    assert not prefix_attention.supported(model(sliding_window=4096))
    assert not prefix_attention.supported(model(attn_logit_softcapping=50.0))
    assert not prefix_attention.supported(SimpleNamespace(config=SimpleNamespace()))  # attention not pluggable


def test_model_cascade_key_reaches_the_backend(tiny_model_dir):
    from cai.backends import load_backend
    from cai.config import ModelConfig

    assert load_backend(ModelConfig(name=str(tiny_model_dir))).cascade is True
    off = load_backend(ModelConfig(name=str(tiny_model_dir), cascade=False))
    assert off.cascade is False
    off.close()


def _paired_texts() -> list[str]:
    """Choice-style prompts after a common prefix: each conversation asked in both orders (the pair
    shares the conversation past the prefix), and one short conversation asked once."""
    convs = ["Human: How should I store flour so it keeps? ", "Human: My neighbour's dog barks all night, what now? ",
             "Human: Can you explain how vaccines train the immune system? "]
    answers = [("Keep it airtight and cool.", "No idea."), ("Talk to them first.", "Get revenge."),
               ("They show it a harmless piece of a germ.", "I won't discuss that.")]
    texts = []
    for conv, (a, b) in zip(convs, answers):
        texts += [SHARED + conv + f"Which is better? (A) {a} (B) {b} The answer is:",
                  SHARED + conv + f"Which is better? (A) {b} (B) {a} The answer is:"]
    return texts + [SHARED + "Human: Say hi. Which is better? (A) Hi. (B) Go away. The answer is:"]


@pytest.fixture()
def forward_rows(backend, monkeypatch):
    """The batch size of each of the backend's forward passes (a packed pass's rows)."""
    rows, real = [], backend._forward

    def counted(shared, **inputs):
        packed = inputs.get("packed")
        rows.append(inputs["input_ids"].shape[0] if packed is None else packed.rows)
        return real(shared, **inputs)

    monkeypatch.setattr(backend, "_forward", counted)
    return rows


@pytest.mark.parametrize("cascade", [True, False])
def test_grouped_prefill_scores_match_one_pass_over_each_suffix(backend, monkeypatch, forward_rows, cascade):
    """Rows sharing a stretch past the common prefix (a pair in both orders) have it prefilled once per
    run and their own tails on top; a row in no run sees none of that first pass. Same scores as one
    pass over every row's whole suffix."""
    backend.cascade = cascade
    backend.batch_size = 8
    texts, options = _paired_texts(), [" (A)", " (B)"]
    monkeypatch.setattr("cai.backends.hf.GROUP_MIN_TOKENS", 10**9)
    before = backend.stats["prefix_reused_tokens"]
    plain = backend.choice_logprobs(texts, options)
    plain_reused = backend.stats["prefix_reused_tokens"] - before
    assert forward_rows[0] == len(texts)  # the prompts' pass: every row in it
    forward_rows.clear()
    backend.prefix_cache.clear()
    monkeypatch.setattr("cai.backends.hf.GROUP_MIN_TOKENS", 4)
    monkeypatch.setattr("cai.backends.hf.GROUP_MAX_COST", 1.0)
    before = backend.stats["prefix_reused_tokens"]
    grouped = backend.choice_logprobs(texts, options)
    assert forward_rows[:2] == [3, len(texts)]  # the three pairs' shared stretches, then every row's tail
    assert plain_reused > 0 and backend.stats["prefix_reused_tokens"] - before == plain_reused  # every row counted
    assert torch.allclose(torch.tensor(grouped), torch.tensor(plain), rtol=1e-6, atol=1e-5)


def test_shared_runs_cover_every_row_and_keep_a_tail():
    from cai.backends.hf import _shared_runs

    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 4], [1, 9, 9], [1, 9, 9, 7]]
    assert _shared_runs(rows, 1, 2) == [(2, [0, 1, 2]), (0, [3]), (0, [4])]
    assert _shared_runs(rows, 1, 1) == [(2, [0, 1, 2]), (1, [3, 4])]  # [1, 9, 9] keeps its last token
    assert _shared_runs([], 0, 1) == []


def test_grouped_prefill_generates_the_same_text(backend, monkeypatch, forward_rows):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5)
    texts = _paired_texts()
    backend.batch_size = 8
    monkeypatch.setattr("cai.backends.hf.GROUP_MIN_TOKENS", 10**9)
    plain = backend.generate(texts, params, seeds=list(range(len(texts))))
    forward_rows.clear()
    backend.prefix_cache.clear()
    monkeypatch.setattr("cai.backends.hf.GROUP_MIN_TOKENS", 4)
    monkeypatch.setattr("cai.backends.hf.GROUP_MAX_COST", 1.0)
    grouped = backend.generate(texts, params, seeds=list(range(len(texts))))
    assert forward_rows[:2] == [3, len(texts)]
    assert grouped == plain


def test_grouped_prefill_is_off_without_prefix_reuse(backend, monkeypatch, forward_rows):
    """``reuse_prefix=False`` means every row computes its whole prompt: no shared stretch either."""
    backend.reuse_prefix = False
    backend.batch_size = 8
    monkeypatch.setattr("cai.backends.hf.GROUP_MIN_TOKENS", 4)
    monkeypatch.setattr("cai.backends.hf.GROUP_MAX_COST", 1.0)
    texts = _paired_texts()
    backend.choice_logprobs(texts, [" (A)", " (B)"])
    assert forward_rows[0] == len(texts)


# ------------------------------------------------------------------ packed prefill and option branches


def test_packed_rows_unpack_into_the_padded_grid_and_back():
    index = torch.tensor([0, 1, 2, 5])  # rows of width 3: row 0 is full, row 1 has one real token (left padding)
    packed = prefix_attention.Packed(2, 3, index)
    x = torch.arange(1, 4 * 2 * 2 + 1, dtype=torch.float32).view(1, 2, 4, 2)  # [1, heads, N, d]
    grid = packed.unpack(x)
    assert grid.shape == (2, 2, 3, 2)
    assert torch.equal(grid[0], x[0, :, :3]) and torch.equal(grid[1, :, 2], x[0, :, 3])
    assert torch.equal(grid[1, :, :2], torch.zeros(2, 2, 2))
    assert torch.equal(packed.pack(grid.transpose(1, 2)), x.transpose(1, 2))  # [1, N, heads, d]


@pytest.fixture()
def packed_passes(backend, monkeypatch):
    """Whether each of the backend's forward passes ran packed."""
    seen, real = [], backend._forward

    def counted(shared, **inputs):
        seen.append(inputs.get("packed") is not None)
        return real(shared, **inputs)

    monkeypatch.setattr(backend, "_forward", counted)
    return seen


@pytest.mark.parametrize(("reuse_prefix", "cascade"), [(False, False), (True, False), (True, True)])
def test_packed_prefill_matches_the_padded_batch(backend, packed_passes, reuse_prefix, cascade):
    """A padded batch prefilled as one sequence of its real tokens scores and generates as the padded batch does."""
    backend.reuse_prefix, backend.cascade = reuse_prefix, cascade
    texts = [backend.render(c) for c in chats()]
    assert len({len(ids) for ids in backend.encode(texts)}) > 1  # the batch has padding
    options = [" (A)", " (B)", " Let's think"]
    params = SamplingParams(max_new_tokens=10)
    backend.pack = False
    plain_scores, plain_text = backend.choice_logprobs(texts, options), backend.generate(chats(), params)
    assert not any(packed_passes)
    backend.pack = True
    backend.prefix_cache.clear()
    skipped = backend.stats["prefill_padding_skipped"]
    packed_scores, packed_text = backend.choice_logprobs(texts, options), backend.generate(chats(), params)
    assert any(packed_passes) and backend.stats["prefill_padding_skipped"] > skipped
    assert torch.allclose(torch.tensor(packed_scores), torch.tensor(plain_scores), rtol=1e-6, atol=1e-5)
    assert packed_text == plain_text


@pytest.mark.parametrize("pack", [True, False])
def test_option_tokens_branch_off_the_prompts_own_pass(backend, forward_rows, pack):
    """Packed, the options' tokens run in the prompts' last pass (no second pass over copies of the
    cache), each seeing the prompt and its own option's earlier tokens only, a shared leading token
    once; options of one token, of several, and sharing a start all score as one plain forward over
    prompt + option does."""
    backend.pack = pack
    texts = [backend.render(c + [{"role": "assistant", "content": "The answer is:"}]) for c in chats()]
    options = [" (A)", " (B)", " (A) because", " no", "!"]
    tok = backend.tokenizer
    alone = [tok(o, add_special_tokens=False)["input_ids"] for o in options]
    assert len(alone[2]) > len(alone[0]) > 1 and alone[2][:len(alone[0])] == alone[0] and len(alone[4]) == 1
    got = backend.choice_logprobs(texts, options)
    batches = [4, 1]  # batch_size 4
    assert forward_rows == (batches if pack else [4, 4 * len(options), 1, len(options)])
    for text, row in zip(texts, got):
        p = tok(text, add_special_tokens=False)["input_ids"]
        for option, value in zip(options, row):
            o = tok(text + option, add_special_tokens=False)["input_ids"][len(p):]
            with torch.no_grad():
                lp = backend.model(torch.tensor([p + o])).logits.log_softmax(-1)[0]
            assert value == pytest.approx(sum(lp[len(p) - 1 + k, o[k]].item() for k in range(len(o))), abs=1e-4)
