"""The compiled single-row decode path: same tokens as the plain loop, windows, and where it applies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cai.backends import static_decode
from cai.backends.hf import HFBackend
from cai.types import SamplingParams

CHATS = [[{"role": "user", "content": "Tell me a story about a lighthouse keeper and a storm."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "0 1 2 3"}]]


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    """A plain backend and one with the compiled decode, on the same weights."""
    plain = HFBackend.from_spec(str(tiny_model_dir), batch_size=1, dtype="float32", device="cpu")
    compiled = HFBackend(plain.model, plain.tokenizer, batch_size=1, compile_decode=True)
    assert compiled.static_decoder is not None
    return plain, compiled


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=24),
                                    SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=3),
                                    SamplingParams(max_new_tokens=24, stop=["a"])],
                         ids=["greedy", "sampled", "stop"])
def test_compiled_decode_gives_the_plain_loops_tokens(pair, params):
    plain, compiled = pair
    for chat in CHATS:
        want = plain.generate_tokens([chat], params, seeds=[7])[0]
        got = compiled.generate_tokens([chat], params, seeds=[7])[0]
        assert (got.token_ids, got.text, got.ended, got.end_token) == (
            want.token_ids, want.text, want.ended, want.end_token)
    seconds = compiled.static_decoder.compile_seconds
    assert list(seconds) == [256] and seconds[256] > 0  # these short chats fit one window: one compile, timed


def test_compiled_step_reads_grouped_heads_in_place(pair):
    """The compiled step attends through `gqa_attention` (no K/V head repeated per query head), only
    inside the step; it equals SDPA over repeated heads, with a mask."""
    import torch

    plain, compiled = pair
    config = plain.model.config
    assert config.num_key_value_heads < config.num_attention_heads  # the tiny model groups its heads
    assert compiled.static_decoder._attention == static_decode.GQA_IMPLEMENTATION
    compiled.generate_tokens([CHATS[0]], SamplingParams(max_new_tokens=3), seeds=[0])
    assert config._attn_implementation == "sdpa"
    query, key, value = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=mask, scale=0.3)
    got, _ = static_decode.gqa_attention(None, query, key, value, mask, scaling=0.3)
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-6)


def test_compiled_streaming_matches_the_plain_stream(pair, monkeypatch):
    plain, compiled = pair
    ids = plain.encode([plain.render(CHATS[0])])[0]
    params = SamplingParams(max_new_tokens=16, temperature=0.8, seed=1)
    want = list(plain.stream(ids).tokens(params, seed=5))
    steps = []
    real_step = static_decode.StaticRow.step
    monkeypatch.setattr(static_decode.StaticRow, "step", lambda row, token: steps.append(1) or real_step(row, token))
    got = list(compiled.stream(ids).tokens(params, seed=5))
    assert len(steps) == len(got) - 1  # every step after the prompt went through the compiled path
    assert [g if g is None else g[0] for g in got] == [w if w is None else w[0] for w in want]
    for g, w in zip(got, want):
        if g is not None:
            assert (g[1] - w[1]).abs().max() < 1e-4


def test_a_stream_reuses_the_step_that_generate_compiled(pair):
    """A stream's step runs outside inference mode; its inputs and cache must still match the graph's
    guards, or the same window compiles a second time (8.5 s of a served request on the bundled model)."""
    from torch._dynamo.utils import counters

    _, compiled = pair
    params = SamplingParams(max_new_tokens=4)
    compiled.generate_tokens([CHATS[0]], params, seeds=[0])
    graphs = counters["stats"]["unique_graphs"]
    ids = compiled.encode([compiled.render(CHATS[0])])[0]
    assert len(list(compiled.stream(ids).tokens(params, seed=0))) == 4
    compiled.generate_tokens([CHATS[1]], params, seeds=[0])
    assert counters["stats"]["unique_graphs"] == graphs


def test_batches_of_several_rows_keep_the_batched_loop(pair, monkeypatch):
    _, compiled = pair
    monkeypatch.setattr(compiled, "_decode_static", lambda *a: pytest.fail("a batch of two went the one-row way"))
    compiled.batch_size = 2
    try:
        assert len(compiled.generate(CHATS, SamplingParams(max_new_tokens=4))) == 2
    finally:
        compiled.batch_size = 1


def test_windows_are_powers_of_two_within_the_context():
    decoder = SimpleNamespace(max_context=1500)
    window = static_decode.StaticDecoder.window_for
    assert [window(decoder, n) for n in (1, 256, 257, 600, 1400, 1500)] == [256, 256, 512, 1024, 1500, 1500]
    assert window(SimpleNamespace(max_context=None), 5000) == 8192


def test_only_full_attention_models_that_compile_as_one_graph():
    def model(compiles=True, **config):
        return SimpleNamespace(config=SimpleNamespace(**config), _can_compile_fullgraph=compiles)

    assert static_decode.supported(model(layer_types=["full_attention"]))
    assert not static_decode.supported(model(layer_types=["full_attention", "sliding_attention"]))
    assert not static_decode.supported(model(compiles=False))


def test_model_compile_decode_key_reaches_the_backend(tiny_model_dir):
    from cai.backends import load_backend
    from cai.config import ModelConfig

    assert load_backend(ModelConfig(name=str(tiny_model_dir))).static_decoder is None
    assert load_backend(ModelConfig(name=str(tiny_model_dir), compile_decode=True)).static_decoder is not None
