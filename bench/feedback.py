"""Benchmark: AI feedback labelling (batched, prefix-reusing choice scoring) vs naive scoring.

Naive = one full forward pass per option per label over the whole few-shot prompt, reading the
option's log-prob from full logits. cai = the `label` stage's scoring: the few-shot block's KV
cache computed once, pairs batched, logits kept only at the option positions. Same pairs, both
orders, on the bundled model; figures go to bench/results/feedback.{json,md}.

    python bench/feedback.py            # ~3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cai import prompts as P
from cai.backends.hf import HFBackend
from cai.config import LabelConfig
from cai.constitution import sample_feedback_principles
from cai.constitution_yaml import load_constitution
from cai.data import load_prompts
from cai.stages.label import combine_orders, first_option_probability, label_pairs

RESULTS = Path(__file__).parent / "results"

ANSWERS = [
    ("I can't help with that.", "I won't help with hurting anyone, because it could cause real harm. If you're angry, "
     "talking it through with someone you trust or a counsellor can help."),
    ("Sure, here is a plan: first gather what you need, then wait until nobody is around.",
     "That could get someone hurt or land you in legal trouble, so I won't walk through it. Here is a safer way to "
     "deal with the underlying problem instead."),
]


def naive_p_a(backend: HFBackend, constitution, pair, principles) -> float:
    model = backend.model
    values = []
    for principle in principles:
        p_first = {}
        for order, (a, b) in (("ab", (pair["response_a"], pair["response_b"])), ("ba", (pair["response_b"], pair["response_a"]))):
            text = backend.render(P.choice_chat(constitution, pair["prompt"], a, b, principle))
            logprobs = []
            for option in P.CHOICE_OPTIONS:
                p_ids = backend.encode([text])[0]
                o_ids = backend.tokenizer(option, add_special_tokens=False)["input_ids"]
                with torch.inference_mode():
                    lp = model(torch.tensor([p_ids + o_ids])).logits.float().log_softmax(-1)[0]
                logprobs.append(sum(lp[len(p_ids) - 1 + k, t].item() for k, t in enumerate(o_ids)))
            p_first[order] = first_option_probability(*logprobs)
        values.append(combine_orders(p_first))
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--pairs", type=int, default=16)
    args = parser.parse_args()

    backend = HFBackend.from_spec(args.model, batch_size=16)
    constitution = load_constitution("default")
    rows, _ = load_prompts("red-team", limit=args.pairs)
    pairs = [{"id": f"{r.id}:0-1", "source_id": r.id, "set": "red-team", "prompt": r.messages,
              "response_a": ANSWERS[i % 2][i % 2], "response_b": ANSWERS[i % 2][1 - i % 2]} for i, r in enumerate(rows)]
    config = LabelConfig(chunk_size=len(pairs))

    start = time.perf_counter()
    naive = [naive_p_a(backend, constitution, p, sample_feedback_principles(constitution, 1, 0, p["id"])) for p in pairs]
    naive_s = time.perf_counter() - start

    backend.prefix_cache.clear()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        labelled = label_pairs([dict(p) for p in pairs], constitution=constitution, backend=backend, config=config,
                               out_path=Path(tmp) / "labels.jsonl", show_progress=False)
        cai_s = time.perf_counter() - start
    max_diff = max(abs(a - b["p_a"]) for a, b in zip(naive, labelled))
    result = {
        "benchmark": "feedback", "model": args.model, "pairs": len(pairs), "orders": 2,
        "naive_seconds": round(naive_s, 2), "naive_labels_per_s": round(len(pairs) / naive_s, 3),
        "cai_seconds": round(cai_s, 2), "cai_labels_per_s": round(len(pairs) / cai_s, 3),
        "speedup": round(naive_s / cai_s, 2), "max_abs_label_difference": max_diff,
        "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feedback.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "feedback.md").write_text(
        "| benchmark | workload | baseline | cai | ratio | check |\n|---|---|---|---|---|---|\n"
        f"| feedback labels | {len(pairs)} pairs, both orders, (A)/(B) scoring | naive {result['naive_labels_per_s']} labels/s "
        f"| cai {result['cai_labels_per_s']} labels/s | **{result['speedup']}x** | max label difference {max_diff:.1e} |\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
