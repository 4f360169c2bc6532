"""Benchmark: cai's generation loop against the ``model.generate`` calls a user would make instead.

The workload is the one cai's stages give their model: prompts that share a long few-shot prefix
(~1,500 tokens of worked examples, then a red-team request), greedy, a fixed number of new tokens.
Every row runs in this one process, on the same model, token ids, batch size, ``max_new_tokens``
and EOS ids, and every baseline's texts are compared with cai's:

- **batched generate** (the baseline the target is about): ``model.generate`` over batches of
  ``--batch-size`` rows, left-padded with an attention mask, greedy, transformers' default cache,
  rows sorted by length as cai sorts them. This is what a careful user writes.
- **per-prompt generate**: one ``model.generate`` per prompt, no padding; what a first script does.
- **cai HFBackend.generate**: the real path; the shared prefix is prefilled once (cold cache, so
  that prefill is timed) and its KV cache reused by every row, a preallocated cache, finished rows
  dropped from the batch.
- **cai without prefix reuse** (ablation): the same backend built with ``reuse_prefix=False``, so
  every row prefills its whole prompt; the gap to the row above is what the prefix reuse buys.
- **cai with the prefix copied per row** (ablation): ``cascade=False``, the prefix prefilled once
  but its K/V copied into every row's cache, as before shared-prefix attention; the gap is what
  reading the prefix once per decode step buys.
- **llama.cpp, one prompt at a time** (optional peer, llama-cpp-python): ``Llama.generate`` on the
  same token ids, greedy, f32 GGUF written by ``cai export``, f32 KV cache; its prompt cache keeps
  the previous prompt's KV and evaluates only what follows the shared prefix (the check column
  gives llama.cpp's own count of prompt tokens evaluated).
- **llama.cpp batched decode** (optional peer): what ``llama-batched-bench`` does with a shared
  prompt, through llama.cpp's C API: the prefix decoded once, shared by ``--batch-size``
  sequences, each row's suffix, then one batch per step with one token per live row; timed end
  to end, and its decode steps alone as their own row. The issue's target is cai against
  llama.cpp's warm 16-slot server; ``llama-server`` is not part of llama-cpp-python, so the target
  here is its fallback, cai >= 1.2x these decode steps (cai's own figure includes its prefill).
  cai's decode steps are also timed apart (its one-token forward passes, `timing_decode_steps`)
  and set beside llama.cpp's as their own row, without a target.
- **batch 1**: the first red-team prompt alone, no few-shot prefix, ``--single-tokens`` new
  tokens: cai on a fresh ``HFBackend(batch_size=1, compile_decode=True)`` (static KV cache, compiled
  step; its first call, which compiles, timed apart), the same without compiling, ``model.generate``
  and llama.cpp, each the fastest of 3 calls from an empty cache (prompt eval included); target
  cai >= 0.8x llama.cpp.

Without llama-cpp-python (or with ``CAI_BENCH_NO_LLAMA=1``) the llama.cpp rows are skipped, and
the rows holding their targets say why, with ``met`` left empty.
llama.cpp's threads wait for each other at every operation, so it suffers more than torch from
another busy process: with one on the same 2 cores its 2-thread decode ran ~10x slower than its
1-thread decode. Take its figures on an otherwise idle machine.

**% of decode compute limit**: the matmul FLOPs each generated token needs, times tokens/s, over
the fp32 matmul peak measured in this run: the median of 5 best-of-8 measurements before the rows
and 5 after (``common.matmul_peak_samples``, same threads), with their range printed. Per token, at
context length ``c`` (prompt tokens + tokens generated before it)::

    FLOPs(c) = 2 * N_body + 2 * V * d + 4 * n_layers * c * d

``N_body`` is the parameters without the embedding matrix; ``2 V d`` is the LM head, a real matmul
every step even though this model ties it to the (free) embedding lookup; ``4 n_layers c d`` is
attention's ``q k^T`` and ``p v`` (2 c d each per layer, d = heads x head_dim; GQA shares K/V
but not this work). The figure is averaged over every token each side really generated. Its
seconds include the prompts' prefill, so it is a lower bound on the decode loop's own efficiency.
Figures go to bench/results/generation.{json,md}.

    HF_HUB_OFFLINE=1 python bench/generation.py           # 32 prompts x 64 tokens, ~15-20 minutes on 2 CPU cores
    HF_HUB_OFFLINE=1 python bench/generation.py --quick   # writes generation.quick.{json,md}
    HF_HUB_OFFLINE=1 python bench/generation.py --prompts 8 --new-tokens 32 --batch-size 8 --model path/to/model
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import common
import llama_peer
import torch

FULL = {"prompts": 32, "new_tokens": 64, "batch_size": 16, "prefix_tokens": 1500, "single_tokens": 64}
QUICK = {"prompts": 2, "new_tokens": 8, "batch_size": 2, "prefix_tokens": 200, "single_tokens": 8}
REPEATS = 3
"""Calls per side at batch 1, the fastest kept: one call there takes about a second, so noise could decide."""
LLAMA_BATCHED_TARGET = 1.2
"""cai over llama.cpp's batched decode steps (the issue's fallback target when llama-server can't run here)."""
BATCH_ONE_TARGET = 0.8


@dataclass(frozen=True)
class Shape:
    """What the FLOPs count needs from the model config."""

    body_params: int
    vocab: int
    hidden: int
    layers: int

    @classmethod
    def of(cls, model: Any) -> Shape:
        total = sum(p.numel() for p in model.parameters())  # a tied LM head is counted once
        embedding = model.get_input_embeddings().weight
        config = model.config
        return cls(total - embedding.numel(), embedding.shape[0],
                   config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
                   config.num_hidden_layers)

    def decode_flops(self, prompt_lengths: Sequence[int], generated: Sequence[int]) -> float:
        """Matmul FLOPs of generating ``generated[i]`` tokens after a prompt of ``prompt_lengths[i]``."""
        per_token = 2 * self.body_params + 2 * self.vocab * self.hidden
        total = 0.0
        for length, g in zip(prompt_lengths, generated):
            context = g * length + g * (g - 1) / 2  # sum of the context lengths the g tokens see
            total += g * per_token + 4 * self.layers * self.hidden * context
        return total


@dataclass
class Side:
    """One row's measurement: texts, real generated tokens per prompt, and seconds."""

    texts: list[str]
    tokens: list[int]
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / self.seconds


def few_shot_prefix(tokenizer: Any, target_tokens: int) -> str:
    """Worked examples (helpfulness prompts with short model-style answers) up to ~target tokens."""
    from cai.data import load_prompts

    rows, _ = load_prompts("helpfulness", split="train")
    parts, length = [], 0
    for r in rows:
        example = f"Example request: {r.messages[-1]['content']}\nExample answer: A short, direct and careful reply.\n\n"
        length += len(tokenizer(example, add_special_tokens=False)["input_ids"])
        parts.append(example)
        if length >= target_tokens:
            break
    return "Here are examples of how a careful assistant answers.\n\n" + "".join(parts)


def timed(fn: Callable[[], Side]) -> Side:
    """``fn()``, with its wall time as the side's seconds."""
    start = time.perf_counter()
    side = fn()
    side.seconds = time.perf_counter() - start
    return side


def run_hf(model: Any, tokenizer: Any, ids: list[list[int]], batch_size: int, new_tokens: int, eos: set[int],
           pad: int) -> Side:
    """``model.generate`` over ``ids`` in batches of ``batch_size`` (1 = one call per prompt)."""
    out = common.batched_generate(model, ids, batch_size=batch_size, max_new_tokens=new_tokens, eos_ids=sorted(eos),
                                  pad_id=pad)
    return Side([tokenizer.decode(t, skip_special_tokens=True) for t in out], [len(t) for t in out], 0.0)


def timing_decode_steps(backend: Any, steps: Any) -> Any:
    """Wrap ``backend._forward`` so one-token passes (decode steps) add their rows and seconds to ``steps``.

    The bench's own instrument, so cai's decode steps can be set beside llama.cpp's like for like;
    returns the original method, for the caller to put back."""
    original = backend._forward

    def forward(shared_prefix: Any, **inputs: Any) -> Any:
        if inputs["input_ids"].shape[1] != 1:
            return original(shared_prefix, **inputs)
        started = time.perf_counter()
        out = original(shared_prefix, **inputs)
        steps.seconds += time.perf_counter() - started
        steps.tokens += inputs["input_ids"].shape[0]
        return out

    backend._forward = forward
    return original


def run_cai(backend: Any, chats: list, params: Any) -> Side:
    """cai's ``HFBackend.generate_tokens`` from a cold prefix cache (so any prefix prefill is timed)."""
    backend.prefix_cache.clear()
    out = backend.generate_tokens(chats, params)
    return Side([g.text for g in out], [len(g.token_ids) for g in out], 0.0)


def best_of(fn: Callable[[], Side], repeats: int) -> Side:
    """The fastest of ``repeats`` timed calls of ``fn`` (greedy, so every call gives the same texts)."""
    return min((timed(fn) for _ in range(repeats)), key=lambda side: side.seconds)


def decoded(tokenizer: Any, out: list[list[int]], seconds: float = 0.0) -> Side:
    """A side from generated token lists, their texts decoded by cai's tokenizer."""
    return Side([tokenizer.decode(t, skip_special_tokens=True) for t in out], [len(t) for t in out], seconds)


def run_llama(llm: Any, tokenizer: Any, ids: list[list[int]], new_tokens: int, eos: set[int]) -> tuple[Side, int]:
    """`llama_peer.one_at_a_time` as a side, with llama.cpp's count of prompt tokens it evaluated."""
    out, evaluated = llama_peer.one_at_a_time(llm, ids, new_tokens, eos)
    return decoded(tokenizer, out), evaluated


def batch_one(backend: Any, chat: list[dict[str, str]], new_tokens: int, llm: Any | None) -> tuple[dict[str, Side], float]:
    """One short chat at batch 1: cai, ``model.generate`` and (where ``llm`` is given) llama.cpp.

    cai runs on two fresh ``HFBackend(batch_size=1)`` over the same model: "cai" with the compiled
    decode (its first call, which compiles, is timed apart) and "plain" without. Every side then
    gets `REPEATS` calls from an empty cache (prompt eval included) and keeps its fastest.

    Returns:
        The sides ("cai", "plain", "hf", "llama") and the seconds of cai's first call.
    """
    from cai.backends.hf import HFBackend
    from cai.types import SamplingParams

    compiled = HFBackend(backend.model, backend.tokenizer, batch_size=1, compile_decode=True)
    plain = HFBackend(backend.model, backend.tokenizer, batch_size=1)
    params = SamplingParams(max_new_tokens=new_tokens)
    ids = backend.encode([backend.render(chat)])
    first = timed(lambda: run_cai(compiled, [chat], params)).seconds
    sides = {"cai": best_of(lambda: run_cai(compiled, [chat], params), REPEATS),
             "plain": best_of(lambda: run_cai(plain, [chat], params), REPEATS),
             "hf": best_of(lambda: run_hf(backend.model, backend.tokenizer, ids, 1, new_tokens, backend.eos_ids,
                                          backend.pad_id), REPEATS)}
    if llm is not None:
        sides["llama"] = best_of(lambda: run_llama(llm, backend.tokenizer, ids, new_tokens, backend.eos_ids)[0], REPEATS)
    if compiled.static_decoder is None:
        raise SystemExit("this model's decoding step can't be compiled; the batch-1 row measures the compiled path")
    compiled.close()
    plain.close()
    return sides, first


def batch_one_rows(one: dict[str, Side], first_call: float, prompt_tokens: int,
                   missing: str | None) -> list[dict[str, Any]]:
    """The batch-1 rows: cai's (the target against llama.cpp) and each baseline's."""
    names = {"hf": "model.generate batch 1 tokens/s", "llama": "llama.cpp f32 batch 1 tokens/s",
             "plain": "cai batch 1, uncompiled decode tokens/s"}
    labels = {"hf": "model.generate", "llama": "llama.cpp", "plain": "uncompiled"}
    others = [k for k in ("llama", "hf", "plain") if k in one]  # llama.cpp first: the target is about it
    ratios = {names[k]: one["cai"].tokens_per_s / one[k].tokens_per_s for k in others}

    def measured(key: str) -> str:
        return f"{sum(one[key].tokens)} tokens in {one[key].seconds:.2f} s, best of {REPEATS} calls, prompt eval included"

    check = (f"one {prompt_tokens}-token prompt, no few-shot prefix, compiled decode (model.compile_decode): "
             f"{measured('cai')} (first call {first_call:.1f} s with the compile, left out); identical greedy text: "
             + ", ".join(f"{common.same_count(one['cai'].texts, one[k].texts)} {labels[k]}" for k in others)
             + ("" if "llama" in one else f"; llama.cpp {missing}"))
    return [common.row("cai batch 1, compiled decode tokens/s", one["cai"].tokens_per_s, "tokens/s", check, ratio_vs=ratios,
                       target=f">= {BATCH_ONE_TARGET}x llama.cpp f32 at batch 1",
                       met=ratios[names["llama"]] >= BATCH_ONE_TARGET if "llama" in one else None),
            *[common.row(names[k], one[k].tokens_per_s, "tokens/s", measured(k)) for k in others]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--prompts", type=int, help=f"prompts (default {FULL['prompts']}; --quick {QUICK['prompts']})")
    parser.add_argument("--new-tokens", type=int, help=f"max new tokens per prompt (default {FULL['new_tokens']})")
    parser.add_argument("--batch-size", type=int, help=f"rows per batch on both sides (default {FULL['batch_size']})")
    parser.add_argument("--prefix-tokens", type=int, help=f"shared few-shot prefix, ~tokens (default {FULL['prefix_tokens']})")
    parser.add_argument("--single-tokens", type=int, help=f"new tokens in the batch-1 rows (default {FULL['single_tokens']})")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the bench runs; writes generation.quick.*")
    args = parser.parse_args()
    sizes = {k: getattr(args, k) or v for k, v in (QUICK if args.quick else FULL).items()}
    common.set_threads(args.threads)

    from cai.backends.hf import HFBackend
    from cai.data import load_prompts
    from cai.types import SamplingParams

    started = time.perf_counter()
    samples = common.matmul_peak_samples()
    backend = HFBackend.from_spec(args.model, batch_size=sizes["batch_size"], dtype="float32", device="cpu")
    model, tok = backend.model, backend.tokenizer
    no_reuse = HFBackend(model, tok, batch_size=sizes["batch_size"], reuse_prefix=False)  # same weights, no prefix cache
    copied = HFBackend(model, tok, batch_size=sizes["batch_size"], cascade=False)  # the prefix's K/V copied per row
    prefix = few_shot_prefix(tok, sizes["prefix_tokens"])
    questions, _ = load_prompts("red-team", limit=sizes["prompts"])
    chats = [[{"role": "user", "content": prefix + "Now the real request: " + q.messages[-1]["content"]}]
             for q in questions]
    ids = backend.encode([backend.render(c) for c in chats])  # the exact token ids cai feeds its loop
    lengths = [len(r) for r in ids]
    params = SamplingParams(max_new_tokens=sizes["new_tokens"])
    eos, pad, batch, new = backend.eos_ids, backend.pad_id, sizes["batch_size"], sizes["new_tokens"]

    # Warm both code paths on a short prompt, so neither side pays the first call's set-up.
    backend.generate([[{"role": "user", "content": "Hi"}]] * 2, SamplingParams(max_new_tokens=2))
    run_hf(model, tok, [ids[0][-16:]] * 2, 2, 2, eos, pad)

    cai_steps = llama_peer.Steps()
    original_forward = timing_decode_steps(backend, cai_steps)
    sides = {"cai": timed(lambda: run_cai(backend, chats, params))}
    backend._forward = original_forward
    shared = max((len(k) for k in backend.prefix_cache.entries), default=0)
    sides["ablation"] = timed(lambda: run_cai(no_reuse, chats, params))
    sides["copied"] = timed(lambda: run_cai(copied, chats, params))
    sides["batched"] = timed(lambda: run_hf(model, tok, ids, batch, new, eos, pad))
    sides["single"] = timed(lambda: run_hf(model, tok, ids, 1, new, eos, pad))
    missing, llm, versions = llama_peer.missing(), None, {}
    if missing is None:
        import llama_cpp

        gguf = llama_peer.f32_gguf(args.model)
        llm = llama_peer.open_llama(gguf, n_ctx=-(-(max(lengths) + new + 1) // 256) * 256)
        versions["llama_cpp"] = llama_cpp.__version__
        run_llama(llm, tok, [ids[0][-16:]], 2, eos)  # warm: weights paged in, threads started
        start = time.perf_counter()
        sides["llama"], evaluated = run_llama(llm, tok, ids, new, eos)
        sides["llama"].seconds = time.perf_counter() - start
        out, seconds, steps = llama_peer.batched(llm, ids, new, eos, batch)
        sides["llama_batched"] = decoded(tok, out, seconds)
    short_chat = [{"role": "user", "content": questions[0].messages[-1]["content"]}]
    one, first_call = batch_one(backend, short_chat, sizes["single_tokens"], llm)
    if llm is not None:
        llm.close()
    cai, ablation, batched, single = (sides[k] for k in ("cai", "ablation", "batched", "single"))
    samples += common.matmul_peak_samples()
    peak = common.median(samples)

    shape = Shape.of(model)
    pct = {k: 100 * shape.decode_flops(lengths, s.tokens) / s.seconds / peak for k, s in sides.items()}
    names = {"batched": f"batched model.generate (batch {batch}) tokens/s",
             "single": "per-prompt model.generate tokens/s",
             "ablation": "cai without prefix reuse tokens/s",
             "copied": "cai with the prefix copied per row (cascade off) tokens/s",
             "llama": "llama.cpp (llama-cpp-python), one prompt at a time, prefix reused tokens/s",
             "llama_batched": f"llama.cpp batched decode, shared prefix once, {batch} sequences tokens/s",
             "llama_steps": "llama.cpp batched decode, decode steps only tokens/s"}
    llama_keys = [k for k in ("llama", "llama_batched") if k in sides]  # absent where llama.cpp was skipped

    def measured(key: str) -> str:
        return f"{sum(sides[key].tokens)} tokens in {sides[key].seconds:.1f} s; {pct[key]:.1f}% of decode compute limit"

    ratio = cai.tokens_per_s / batched.tokens_per_s
    rows = [
        common.row("fp32 matmul peak", peak / 1e9, "GFLOP/s",
                   f"2048x2048 matmul, median of {len(samples)} best-of-8 (half before the rows, half after), range "
                   f"{min(samples) / 1e9:.0f}-{max(samples) / 1e9:.0f}, {torch.get_num_threads()} threads"),
        common.row("cai HFBackend.generate tokens/s", cai.tokens_per_s, "tokens/s",
                   f"{measured('cai')}; identical greedy text: {common.same_count(cai.texts, batched.texts)} batched, "
                   f"{common.same_count(cai.texts, single.texts)} per-prompt, "
                   f"{common.same_count(cai.texts, ablation.texts)} no-reuse, "
                   f"{common.same_count(cai.texts, sides['copied'].texts)} prefix copied"
                   + "".join(f", {common.same_count(cai.texts, sides[k].texts)} {label}" for k, label in
                             (("llama", "llama.cpp one at a time"), ("llama_batched", "llama.cpp batched")) if k in sides),
                   ratio_vs={names["batched"]: ratio, names["single"]: cai.tokens_per_s / single.tokens_per_s,
                             names["ablation"]: cai.tokens_per_s / ablation.tokens_per_s,
                             names["copied"]: cai.tokens_per_s / sides["copied"].tokens_per_s,
                             **{names[k]: cai.tokens_per_s / sides[k].tokens_per_s for k in llama_keys}},
                   target=">= 6x batched model.generate", met=ratio >= 6),
        common.row(names["batched"], batched.tokens_per_s, "tokens/s", measured("batched")),
        common.row(names["single"], single.tokens_per_s, "tokens/s", measured("single")),
        common.row(names["ablation"], ablation.tokens_per_s, "tokens/s",
                   f"{measured('ablation')}; HFBackend(reuse_prefix=False) on the same model"),
        common.row(names["copied"], sides["copied"].tokens_per_s, "tokens/s",
                   f"{measured('copied')}; HFBackend(cascade=False) on the same model"),
        common.row("cai % of decode compute limit", pct["cai"], "%",
                   f"{shape.decode_flops(lengths, cai.tokens) / sum(cai.tokens) / 1e6:.0f} MFLOP per generated token "
                   f"(mean over cai's tokens) x tokens/s / matmul peak", target=">= 40%", met=pct["cai"] >= 40),
    ]
    versus_steps = "cai HFBackend.generate tokens/s vs llama.cpp decode steps"
    steps_target = f">= {LLAMA_BATCHED_TARGET}x llama.cpp batched decode (decode steps)"
    if missing is None:
        steps_rate = steps.tokens / steps.seconds
        rows += [
            common.row(names["llama"], sides["llama"].tokens_per_s, "tokens/s",
                       f"{measured('llama')}; identical greedy text to cai {common.same_count(cai.texts, sides['llama'].texts)}; "
                       f"llama.cpp evaluated {evaluated} of the {sum(lengths)} prompt tokens"),
            common.row(names["llama_batched"], sides["llama_batched"].tokens_per_s, "tokens/s",
                       f"{measured('llama_batched')}; identical greedy text to cai "
                       f"{common.same_count(cai.texts, sides['llama_batched'].texts)}; decode steps {steps.seconds:.1f} s of it"),
            common.row(names["llama_steps"], steps_rate, "tokens/s",
                       f"{steps.tokens} tokens in {steps.seconds:.1f} s of decode steps (one token per live row each), "
                       "the prefix and suffix prefill left out"),
            common.row("cai decode steps only tokens/s", cai_steps.tokens / cai_steps.seconds, "tokens/s",
                       f"{cai_steps.tokens} tokens in {cai_steps.seconds:.1f} s of cai's one-token forward passes "
                       "(one token per live row each; prefill, argmax and bookkeeping left out, where llama.cpp's "
                       "decode-steps row includes its argmax over each row's logits)",
                       ratio_vs={names["llama_steps"]: cai_steps.tokens / cai_steps.seconds / steps_rate}),
            common.row(versus_steps, cai.tokens_per_s, "tokens/s",
                       "cai's end-to-end figure (its prefill included) over llama.cpp's decode steps alone",
                       ratio_vs={names["llama_steps"]: cai.tokens_per_s / steps_rate}, target=steps_target,
                       met=cai.tokens_per_s / steps_rate >= LLAMA_BATCHED_TARGET),
        ]
    else:
        rows.append(common.row(versus_steps, cai.tokens_per_s, "tokens/s", f"llama.cpp rows {missing}",
                               target=steps_target, met=None))
    short_tokens = len(backend.encode([backend.render(short_chat)])[0])
    rows += batch_one_rows(one, first_call, short_tokens, missing)
    notes = [
        f"Model shape for the FLOPs count: N_body {shape.body_params / 1e6:.1f}M (without the {shape.vocab}x"
        f"{shape.hidden} embedding), {shape.layers} layers, attention width {shape.hidden}.",
        "All rows use the same token ids (cai's chat template render + encode), batch size, max_new_tokens and "
        f"EOS ids {sorted(eos)}; the baselines are timed after cai, the model and threads already warm.",
        (f"llama.cpp: llama-cpp-python {versions['llama_cpp']} on {gguf.name} (cai export --type f32), f32 KV cache, "
         f"{torch.get_num_threads()} threads, prefill in batches of 512; greedy is argmax (temp 0) on both llama.cpp "
         "rows, fed cai's token ids, their tokens decoded by cai's tokenizer."
         if missing is None else f"llama.cpp rows {missing}."),
        f"Batch 1: the first red-team prompt alone ({short_tokens} tokens, no "
        f"few-shot prefix), <= {sizes['single_tokens']} new tokens, greedy; cai on fresh HFBackend(batch_size=1) with and without compile_decode, "
        "every side from an empty cache, so each figure's seconds include its prompt eval.",
        f"Whole bench took {time.perf_counter() - started:.0f} s" + (" (--quick: not final figures)" if args.quick else ""),
    ]
    workload = (f"{args.model}, fp32 CPU: {len(chats)} prompts of {sum(lengths) / len(lengths):.0f} tokens on average "
                f"sharing a {shared}-token prefix, <= {new} new tokens each, greedy, batch {batch}")
    out = common.result("generation", args.quick, workload, rows, notes, **versions)
    common.write_results(out, common.stem("generation", args.quick))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
