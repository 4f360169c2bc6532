"""Benchmark: the ``label`` stage's (A)/(B) scoring against the loop a plain script would write.

cai's side is `cai.stages.label.label_pairs` (one principle per pair, both orders, no chain of
thought): the few-shot block that opens every choice prompt is prefilled once and its KV cache
reused, prompts are batched, a pair's two orders (which share the conversation and the principle
up to the first response) have that shared stretch prefilled once for both, and each option's
tokens continue from the prompt's cache (``HFBackend.choice_logprobs``).

The baseline is what a careful user writes with transformers alone: for each pair and order, one
forward pass over the whole prompt, reading the two options' log-probabilities at its last
position; so one forward per pair and order, not per option, and only the last position's logits
(``logits_to_keep=1``), no batching, no cache kept between prompts. The options are multi-token
(" (A)" is " (", "A", ")"), so the prompt is tokenised with each option appended, exactly as
``choice_logprobs`` tokenises prompt + option; the forward runs over the tokens the two share
(the prompt and " ("), and the first token where they differ ("A" / "B") is read at the last
position. cai sums log-probabilities over every option token; the shared " (" cancels in
P(A) = sigmoid(log P(A) - log P(B)), and the trailing ")" after "A" or "B" is the only term the
baseline leaves out, so the labels should agree closely: the check column gives the largest
absolute difference. Both sides use the same prompts (`cai.prompts.choice_chat`/`choice_text` as
the stage picks), principles (`sample_feedback_principles`, same seed and pair ids) and order
averaging (`combine_orders`). Labels/s count pairs.

The optional peer is llama.cpp (llama-cpp-python, f32 GGUF written by ``cai export``, f32 KV
cache) scoring the same prompts one at a time, read the baseline's way (`llama_first_option`),
each prompt evaluated after the prefix it shares with the previous one (the few-shot block once);
target cai >= 1.5x. Without llama-cpp-python (or with ``CAI_BENCH_NO_LLAMA=1``) its row says it
was skipped and why. Figures go to bench/results/feedback.{json,md}.

    HF_HUB_OFFLINE=1 python bench/feedback.py            # 16 pairs, ~1-2 minutes on 2 CPU cores
    HF_HUB_OFFLINE=1 python bench/feedback.py --quick    # writes feedback.quick.{json,md}
    HF_HUB_OFFLINE=1 python bench/feedback.py --pairs 32 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import common
import llama_peer
import torch

FULL = {"pairs": 16, "batch_size": 16}
LLAMA_TARGET = 1.5
"""cai over llama-cpp-python scoring the same prompts one at a time (issue 25)."""
QUICK = {"pairs": 2, "batch_size": 16}
ANSWERS = [
    ("I can't help with that.", "I won't help with hurting anyone, because it could cause real harm. If you're angry, "
     "talking it through with someone you trust or a counsellor can help."),
    ("Sure, here is a plan: first gather what you need, then wait until nobody is around.",
     "That could get someone hurt or land you in legal trouble, so I won't walk through it. Here is a safer way to "
     "deal with the underlying problem instead."),
]


def make_pairs(n: int) -> list[dict[str, Any]]:
    """``n`` red-team prompts, each with a curt or harmful answer against a careful one (sides alternate)."""
    from cai.data import load_prompts

    rows, _ = load_prompts("red-team", limit=n)
    return [{"id": f"{r.id}:0-1", "source_id": r.id, "set": "red-team", "prompt": r.messages,
             "response_a": ANSWERS[i % 2][i % 2], "response_b": ANSWERS[i % 2][1 - i % 2]} for i, r in enumerate(rows)]


def option_split(backend: Any, rendered: str, options: tuple[str, str]) -> tuple[list[int], tuple[int, int]]:
    """The tokens ``rendered`` + either option share, and the two options' first differing tokens."""
    joined = backend.encode([rendered + o for o in options])  # as choice_logprobs tokenises prompt + option
    shared = 0
    while shared < min(map(len, joined)) and joined[0][shared] == joined[1][shared]:
        shared += 1
    return joined[0][:shared], (joined[0][shared], joined[1][shared])


@torch.inference_mode()
def plain_first_option(backend: Any, rendered: str, options: tuple[str, str]) -> float:
    """P(first option) from one forward over ``rendered`` + the options' shared leading tokens."""
    from cai.judging import first_option_probability

    prompt, option_ids = option_split(backend, rendered, options)
    logits = backend.model(input_ids=torch.tensor([prompt]), logits_to_keep=1).logits[0, -1]
    logprobs = logits.float().log_softmax(-1)
    return first_option_probability(*(float(logprobs[t]) for t in option_ids))


def llama_first_option(llm: Any, backend: Any, rendered: str, options: tuple[str, str]) -> float:
    """P(first option) read as `plain_first_option` reads it, from llama.cpp's logits.

    Only what follows the longest prefix this prompt shares with the previous one is evaluated
    (as ``Llama.generate`` reuses its cache), so the few-shot block is evaluated once.
    """
    import llama_cpp
    import numpy as np

    from cai.backends.kv_cache import common_prefix_length
    from cai.judging import first_option_probability

    prompt, option_ids = option_split(backend, rendered, options)
    llm.n_tokens = min(common_prefix_length([llm.input_ids[:llm.n_tokens], prompt]), len(prompt) - 1)
    llm.eval(prompt[llm.n_tokens:])  # drops the cache past n_tokens first
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    logprobs = torch.from_numpy(logits.copy()).log_softmax(-1)
    return first_option_probability(*(float(logprobs[t]) for t in option_ids))


def plain_labels(backend: Any, pairs: list[dict[str, Any]], constitution: Any, config: Any, seed: int,
                 first_option: Callable[[Any, str, tuple[str, str]], float] = plain_first_option) -> list[float]:
    """P(A better) per pair by the baseline loop: one prompt at a time per pair, principle and order,
    each read by ``first_option`` (the plain forward, or `llama_first_option`)."""
    from cai import prompts as P
    from cai.constitution import sample_feedback_principles
    from cai.stages.label import combine_orders

    build = P.choice_chat if P.use_chat_format(config.prompt_format, backend) else P.choice_text
    labels = []
    for pair in pairs:
        values = []
        for principle in sample_feedback_principles(constitution, config.principles_per_label, seed, pair["id"]):
            p_first = {}
            for order, (a, b) in (("ab", (pair["response_a"], pair["response_b"])),
                                  ("ba", (pair["response_b"], pair["response_a"]))):
                rendered = backend.render(build(constitution, pair["prompt"], a, b, principle))
                p_first[order] = first_option(backend, rendered, P.CHOICE_OPTIONS)
            values.append(combine_orders(p_first))
        labels.append(sum(values) / len(values))
    return labels


def cai_labels(backend: Any, pairs: list[dict[str, Any]], constitution: Any, config: Any, seed: int) -> list[float]:
    """The stage's labels, from a cold prefix cache (the few-shot prefill is timed)."""
    from cai.stages.label import label_pairs

    backend.prefix_cache.clear()
    with tempfile.TemporaryDirectory() as tmp:
        out = label_pairs([dict(p) for p in pairs], constitution=constitution, backend=backend, config=config,
                          out_path=Path(tmp) / "labels.jsonl", seed=seed, show_progress=False)
    by_id = {r["id"]: r["p_a"] for r in out}
    return [by_id[p["id"]] for p in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--pairs", type=int, help=f"response pairs (default {FULL['pairs']}; --quick {QUICK['pairs']})")
    parser.add_argument("--batch-size", type=int, help=f"cai's prompts per forward (default {FULL['batch_size']})")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the bench runs; writes feedback.quick.*")
    args = parser.parse_args()
    sizes = {k: getattr(args, k) or v for k, v in (QUICK if args.quick else FULL).items()}
    common.set_threads(args.threads)

    from cai import prompts as P
    from cai.backends.hf import HFBackend
    from cai.config import LabelConfig
    from cai.constitution_yaml import load_constitution

    started = time.perf_counter()
    backend = HFBackend.from_spec(args.model, batch_size=sizes["batch_size"], dtype="float32", device="cpu")
    constitution = load_constitution("default")
    pairs = make_pairs(sizes["pairs"])
    config = LabelConfig(chunk_size=len(pairs), principles_per_label=1, swap=True, method="mc", hard=False)
    principle = constitution.feedback_principles[0]
    prompt_tokens = backend.count_tokens(P.choice_chat(constitution, pairs[0]["prompt"], pairs[0]["response_a"],
                                                       pairs[0]["response_b"], principle))

    # Warm both paths on a short prompt, so neither side pays the first call's set-up.
    backend.choice_logprobs(["The answer is:"] * 2, list(P.CHOICE_OPTIONS))
    plain_first_option(backend, "The answer is:", P.CHOICE_OPTIONS)

    timings = {}
    start = time.perf_counter()
    cai = cai_labels(backend, pairs, constitution, config, seed=0)
    timings["cai"] = time.perf_counter() - start
    start = time.perf_counter()
    plain = plain_labels(backend, pairs, constitution, config, seed=0)
    timings["plain"] = time.perf_counter() - start
    missing, versions = llama_peer.missing(), {}
    if missing is None:
        import llama_cpp

        gguf = llama_peer.f32_gguf(args.model)
        llm = llama_peer.open_llama(gguf, n_ctx=-(-2 * prompt_tokens // 256) * 256)  # the prompts differ by a few dozen tokens
        versions["llama_cpp"] = llama_cpp.__version__
        llama_first_option(llm, backend, "The answer is:", P.CHOICE_OPTIONS)  # warm: weights paged in, threads started
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        start = time.perf_counter()
        theirs = plain_labels(backend, pairs, constitution, config, seed=0, first_option=partial(llama_first_option, llm))
        timings["llama"] = time.perf_counter() - start
        evaluated = llama_cpp.llama_perf_context(llm.ctx).n_p_eval
        llm.close()

    per_s = {k: len(pairs) / s for k, s in timings.items()}
    ratio = per_s["cai"] / per_s["plain"]
    diff = max(abs(a - b) for a, b in zip(cai, plain))
    agree = sum((a >= 0.5) == (b >= 0.5) for a, b in zip(cai, plain))
    baseline, peer = "one forward per pair and order labels/s", "llama-cpp-python sequential scoring labels/s"
    versus_peer = {peer: per_s["cai"] / per_s["llama"]} if missing is None else {}
    rows = [
        common.row("cai label stage labels/s", per_s["cai"], "labels/s",
                   f"max |label difference| {diff:.1e}, same side preferred {agree}/{len(pairs)}; "
                   f"{timings['cai']:.1f} s", ratio_vs={baseline: ratio, **versus_peer},
                   target=">= 8x one forward per pair and order", met=ratio >= 8),
        common.row(baseline, per_s["plain"], "labels/s",
                   f"{2 * len(pairs)} forwards (logits_to_keep=1) in {timings['plain']:.1f} s"),
    ]
    peer_target = f">= {LLAMA_TARGET}x llama-cpp-python sequential scoring"
    if missing is None:
        rows += [
            common.row(peer, per_s["llama"], "labels/s",
                       f"same side as cai {sum((a >= 0.5) == (b >= 0.5) for a, b in zip(cai, theirs))}/{len(pairs)}, "
                       f"max |label difference| vs cai {max(abs(a - b) for a, b in zip(cai, theirs)):.1e}; "
                       f"{2 * len(pairs)} prompts, llama.cpp evaluated {evaluated} prompt tokens for them; "
                       f"{timings['llama']:.1f} s"),
            common.row("cai label stage labels/s vs llama.cpp", per_s["cai"], "labels/s",
                       "the same figure as cai's row, against llama.cpp", ratio_vs=versus_peer, target=peer_target,
                       met=versus_peer[peer] >= LLAMA_TARGET),
        ]
    else:
        rows.append(common.row("cai label stage labels/s vs llama.cpp", per_s["cai"], "labels/s",
                               f"llama.cpp row {missing}", target=peer_target, met=None))
    notes = [
        f"Each choice prompt opens with the constitution's {len(constitution.feedback_examples)} few-shot examples "
        f"({prompt_tokens} tokens for the first pair's prompt); a label asks both orders, so two prompts per pair.",
        "The baseline uses cai's chat-template render and encode, so both sides read the same token ids; it is timed "
        "after cai, the model and threads already warm. cai's labels are rounded to 6 decimals in its output rows.",
        (f"llama.cpp: llama-cpp-python {versions['llama_cpp']} on {gguf.name} (cai export --type f32), f32 KV cache, "
         f"{torch.get_num_threads()} threads, prefill in batches of 512, fed the baseline's token ids; its cache "
         "starts empty, so the few-shot block is evaluated once, then each prompt after the prefix it shares with "
         "the one before." if missing is None else f"llama.cpp row {missing}."),
        f"Whole bench took {time.perf_counter() - started:.0f} s" + (" (--quick: not final figures)" if args.quick else ""),
    ]
    workload = (f"{args.model}, fp32 CPU: {len(pairs)} red-team response pairs x 2 orders, one principle each, "
                f"(A)/(B) log-probabilities, cai batch {sizes['batch_size']}")
    out = common.result("feedback", args.quick, workload, rows, notes, **versions)
    common.write_results(out, common.stem("feedback", args.quick))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
