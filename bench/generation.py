"""Benchmark: generation with the hf backend (batched, shared-prefix KV reuse) vs a naive loop.

32 prompts share a ~1,500-token few-shot prefix and each asks for 64 new tokens, greedy. The
naive loop is what a first script does: one plain ``model.generate`` per prompt, no reuse.
Both run in this one process on the bundled model; figures go to bench/results/generation.{json,md}.

    python bench/generation.py            # ~5 minutes on 2 CPU cores
    python bench/generation.py --prompts 8 --model path/to/model
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cai.backends.hf import HFBackend
from cai.data import load_prompts
from cai.types import SamplingParams

RESULTS = Path(__file__).parent / "results"


def few_shot_prefix(tokenizer, target_tokens: int) -> str:
    """Worked examples (helpfulness prompts with short model-style answers) up to ~target tokens."""
    rows, _ = load_prompts("helpfulness", split="train")
    parts, length = [], 0
    for row in rows:
        example = f"Example request: {row.messages[-1]['content']}\nExample answer: A short, direct and careful reply.\n\n"
        length += len(tokenizer(example, add_special_tokens=False)["input_ids"])
        parts.append(example)
        if length >= target_tokens:
            break
    return "Here are examples of how a careful assistant answers.\n\n" + "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=1500)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    backend = HFBackend.from_spec(args.model, batch_size=args.batch_size)
    model, tok = backend.model, backend.tokenizer
    prefix = few_shot_prefix(tok, args.prefix_tokens)
    questions, _ = load_prompts("red-team", limit=args.prompts)
    chats = [[{"role": "user", "content": prefix + "Now the real request: " + q.messages[-1]["content"]}]
             for q in questions]
    params = SamplingParams(max_new_tokens=args.new_tokens)
    prompt_tokens = [len(r) for r in backend.encode([backend.render(c) for c in chats])]

    # Naive: one model.generate per prompt, no batching, no reuse.
    start = time.perf_counter()
    naive_tokens, naive_texts = 0, []
    for chat in chats:
        ids = torch.tensor([backend.encode([backend.render(chat)])[0]])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=backend.pad_id, eos_token_id=sorted(backend.eos_ids))
        new = out[0, ids.shape[1]:]
        new = new[~torch.isin(new, torch.tensor(sorted(backend.eos_ids)))]
        naive_tokens += len(new)
        naive_texts.append(tok.decode(new, skip_special_tokens=True))
    naive_s = time.perf_counter() - start

    # cai: batched, length-sorted, shared prefix prefilled once (cold cache: the prefill is timed).
    backend.prefix_cache.clear()
    before = backend.stats["generated_tokens"]
    start = time.perf_counter()
    texts = backend.generate(chats, params)
    cai_s = time.perf_counter() - start
    cai_tokens = backend.stats["generated_tokens"] - before

    same = sum(a == b for a, b in zip(texts, naive_texts))
    result = {
        "benchmark": "generation",
        "model": args.model,
        "prompts": len(chats),
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "shared_prefix_tokens": max((len(k) for k in backend.prefix_cache.entries), default=0),
        "new_tokens_per_prompt": args.new_tokens,
        "batch_size": args.batch_size,
        "naive_seconds": round(naive_s, 2),
        "naive_tokens_per_s": round(naive_tokens / naive_s, 2),
        "cai_seconds": round(cai_s, 2),
        "cai_tokens_per_s": round(cai_tokens / cai_s, 2),
        "speedup": round((cai_tokens / cai_s) / (naive_tokens / naive_s), 2),
        "identical_greedy_outputs": f"{same}/{len(chats)}",
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps(result, indent=2) + "\n")
    line = (
        f"| generation | {result['prompts']} prompts, {result['mean_prompt_tokens']:.0f}-token prompts "
        f"({result['shared_prefix_tokens']} shared), {args.new_tokens} new tokens | naive {result['naive_tokens_per_s']} tok/s "
        f"| cai {result['cai_tokens_per_s']} tok/s | **{result['speedup']}x** | identical greedy: {result['identical_greedy_outputs']} |"
    )
    (RESULTS / "generation.md").write_text(
        "| benchmark | workload | baseline | cai | ratio | check |\n|---|---|---|---|---|---|\n" + line + "\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
