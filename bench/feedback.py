"""Benchmark: the ``label`` stage's (A)/(B) scoring against the loop a plain script would write.

cai's side is `cai.stages.label.label_pairs` (one principle per pair, both orders, no chain of
thought): the few-shot block that opens every choice prompt is prefilled once and its KV cache
reused, prompts are batched, and each option's tokens continue from the prompt's cache
(``HFBackend.choice_logprobs``).

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
averaging (`combine_orders`). Labels/s count pairs. Figures go to bench/results/feedback.{json,md}.

    HF_HUB_OFFLINE=1 python bench/feedback.py            # 16 pairs, ~1-2 minutes on 2 CPU cores
    HF_HUB_OFFLINE=1 python bench/feedback.py --quick    # writes feedback.quick.{json,md}
    HF_HUB_OFFLINE=1 python bench/feedback.py --pairs 32 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch

FULL = {"pairs": 16, "batch_size": 16}
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


@torch.inference_mode()
def plain_first_option(backend: Any, rendered: str, options: tuple[str, str]) -> float:
    """P(first option) from one forward over ``rendered`` + the options' shared leading tokens."""
    from cai.judging import first_option_probability

    joined = backend.encode([rendered + o for o in options])  # as choice_logprobs tokenises prompt + option
    shared = 0
    while shared < min(map(len, joined)) and joined[0][shared] == joined[1][shared]:
        shared += 1
    logits = backend.model(input_ids=torch.tensor([joined[0][:shared]]), logits_to_keep=1).logits[0, -1]
    logprobs = logits.float().log_softmax(-1)
    return first_option_probability(*(float(logprobs[j[shared]]) for j in joined))


def plain_labels(backend: Any, pairs: list[dict[str, Any]], constitution: Any, config: Any, seed: int) -> list[float]:
    """P(A better) per pair by the baseline loop: one forward per pair, principle and order."""
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
                p_first[order] = plain_first_option(backend, rendered, P.CHOICE_OPTIONS)
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

    per_s = {k: len(pairs) / s for k, s in timings.items()}
    ratio = per_s["cai"] / per_s["plain"]
    diff = max(abs(a - b) for a, b in zip(cai, plain))
    agree = sum((a >= 0.5) == (b >= 0.5) for a, b in zip(cai, plain))
    baseline = "one forward per pair and order labels/s"
    rows = [
        common.row("cai label stage labels/s", per_s["cai"], "labels/s",
                   f"max |label difference| {diff:.1e}, same side preferred {agree}/{len(pairs)}; "
                   f"{timings['cai']:.1f} s", ratio_vs={baseline: ratio}, target=">= 8x one forward per pair and order",
                   met=ratio >= 8),
        common.row(baseline, per_s["plain"], "labels/s",
                   f"{2 * len(pairs)} forwards (logits_to_keep=1) in {timings['plain']:.1f} s"),
    ]
    notes = [
        f"Each choice prompt opens with the constitution's {len(constitution.feedback_examples)} few-shot examples "
        f"({prompt_tokens} tokens for the first pair's prompt); a label asks both orders, so two prompts per pair.",
        "The baseline uses cai's chat-template render and encode, so both sides read the same token ids; it is timed "
        "after cai, the model and threads already warm. cai's labels are rounded to 6 decimals in its output rows.",
        f"Whole bench took {time.perf_counter() - started:.0f} s" + (" (--quick: not final figures)" if args.quick else ""),
    ]
    workload = (f"{args.model}, fp32 CPU: {len(pairs)} red-team response pairs x 2 orders, one principle each, "
                f"(A)/(B) log-probabilities, cai batch {sizes['batch_size']}")
    out = common.result("feedback", args.quick, workload, rows, notes)
    common.write_results(out, common.stem("feedback", args.quick))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
