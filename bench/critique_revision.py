"""Benchmark: the critique/revision stage (batched, shared-prefix reuse) vs a naive loop.

The naive loop is what a first script does: for each prompt, one plain ``model.generate`` per
step (initial answer, then critique and revision each round), every prompt re-reading the
constitution's few-shot examples. Both run here on the bundled model with the same prompts,
principles and greedy decoding; figures go to bench/results/critique_revision.{json,md}.

    python bench/critique_revision.py             # ~6 minutes on 2 CPU cores
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
from cai.config import CritiqueConfig, SamplingConfig
from cai.constitution import sample_critique_principles
from cai.constitution_yaml import load_constitution
from cai.data import load_prompts
from cai.stages.critique import clean_output, run_critique_revision

RESULTS = Path(__file__).parent / "results"


def naive(backend: HFBackend, rows, constitution, rounds: int, new_tokens: int, seed: int) -> list[str]:
    model, tok = backend.model, backend.tokenizer
    eos = sorted(backend.eos_ids)

    def one(prompt) -> str:
        ids = torch.tensor([backend.encode([backend.render(prompt)])[0]])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=backend.pad_id, eos_token_id=eos)
        return clean_output(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))

    finals = []
    for row in rows:
        principles = sample_critique_principles(constitution, rounds, seed, row.id)
        response = one(row.messages)
        for r in range(rounds):
            chat = P.critique_chat(constitution, row.messages, response, principles[r])
            critique = one(chat)
            response = one(P.revision_chat(chat, critique, principles[r])) or response
        finals.append(response)
    return finals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    backend = HFBackend.from_spec(args.model, batch_size=16)
    constitution = load_constitution("default")
    rows, _ = load_prompts("red-team", limit=args.prompts)
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    config = CritiqueConfig(rounds=args.rounds, chunk_size=len(rows), response=greedy, critique_sampling=greedy,
                            revision_sampling=greedy)

    start = time.perf_counter()
    naive(backend, rows, constitution, args.rounds, args.new_tokens, seed=0)
    naive_s = time.perf_counter() - start

    backend.prefix_cache.clear()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_critique_revision(rows, constitution=constitution, backend=backend, config=config,
                              out_path=Path(tmp) / "data.jsonl", show_progress=False)
        cai_s = time.perf_counter() - start

    result = {
        "benchmark": "critique_revision", "model": args.model, "prompts": len(rows), "rounds": args.rounds,
        "new_tokens_per_step": args.new_tokens, "few_shot_examples": len(constitution.critique_revision_examples),
        "naive_seconds": round(naive_s, 2), "naive_rows_per_minute": round(60 * len(rows) / naive_s, 2),
        "cai_seconds": round(cai_s, 2), "cai_rows_per_minute": round(60 * len(rows) / cai_s, 2),
        "speedup": round(naive_s / cai_s, 2), "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "critique_revision.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "critique_revision.md").write_text(
        "| benchmark | workload | baseline | cai | ratio |\n|---|---|---|---|---|\n"
        f"| critique/revision | {len(rows)} prompts x {args.rounds} round, {args.new_tokens} tokens per step, "
        f"{result['few_shot_examples']} few-shot examples | naive {result['naive_rows_per_minute']} rows/min | "
        f"cai {result['cai_rows_per_minute']} rows/min | **{result['speedup']}x** |\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
