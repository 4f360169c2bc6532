"""Benchmark: ``cai serve`` answering 32 concurrent clients vs one client at a time.

The same server (in this process, on a loopback port, the `cai serve` defaults) gets the same
requests twice, through the official ``openai`` client: first one after another (each request
runs alone, the baseline a user gets without concurrency), then from 32 clients at once (the
batcher gathers them into shared ``generate`` calls). The requests are greedy, so the two modes
should give the same answers; the table says how many did, so the ratio measures one thing.
Figures go to bench/results/serve.{json,md}.

    python bench/serve.py                       # bundled model, 32 requests, a few minutes on 2 CPU cores
    python bench/serve.py --model path/to/model --requests 64 --new-tokens 64
    python bench/serve.py --threads 1           # on a machine shared with other work
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch

from cai.backends.hf import HFBackend
from cai.data import load_prompts
from cai.serve.server import serve_app

RESULTS = Path(__file__).parent / "results"


def ask(url: str, model: str, chats: list, new_tokens: int) -> list[tuple[str, int]]:
    """Send ``chats`` one after another from one client; (text, completion tokens) for each."""
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) as client:
        replies = [client.chat.completions.create(model=model, messages=chat, max_tokens=new_tokens, temperature=0)
                   for chat in chats]
    return [(r.choices[0].message.content, r.usage.completion_tokens) for r in replies]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--requests", type=int, default=32, help="Requests per mode (the same ones in both).")
    parser.add_argument("--clients", type=int, default=32, help="Concurrent clients in the second mode.")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16, help="The server's batch limit (cai serve's default).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own); 1 is steadier on a machine shared with other work.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    backend = HFBackend.from_spec(args.model)
    rows, _ = load_prompts("helpfulness", limit=args.requests)
    chats = [r.messages for r in rows][: args.requests]
    prompt_tokens = [backend.count_tokens(c) for c in chats]
    with serve_app(backend, "bench", port=0, max_batch=args.max_batch).start() as server:
        ask(server.url, "bench", chats[:1], 4)  # warm up: first forward pass, connection set-up

        stats = server.engine.batcher.stats
        calls0, start = stats.calls, time.perf_counter()
        one = ask(server.url, "bench", chats, args.new_tokens)
        one_s, one_calls = time.perf_counter() - start, stats.calls - calls0
        print(f"one client at a time: {len(chats)} requests in {one_s:.1f} s", flush=True)

        share = [chats[i:: args.clients] for i in range(args.clients)]  # client i sends requests i, i+clients, ...
        calls0, requests0, start = stats.calls, stats.requests, time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            parts = list(pool.map(lambda part: ask(server.url, "bench", part, args.new_tokens), share))
        many_s = time.perf_counter() - start
        many_calls, many_requests = stats.calls - calls0, stats.requests - requests0
    many = [None] * len(chats)
    for i, part in enumerate(parts):
        many[i:: args.clients] = part

    one_tokens, many_tokens = sum(n for _, n in one), sum(n for _, n in many)
    same = sum(a[0] == b[0] for a, b in zip(one, many))
    result = {
        "benchmark": "serve",
        "model": args.model,
        "requests": len(chats),
        "clients": args.clients,
        "mean_prompt_tokens": round(sum(prompt_tokens) / len(prompt_tokens), 1),
        "max_new_tokens": args.new_tokens,
        "max_batch": args.max_batch,
        "one_client_seconds": round(one_s, 2),
        "one_client_requests_per_s": round(len(chats) / one_s, 3),
        "one_client_tokens_per_s": round(one_tokens / one_s, 2),
        "one_client_generate_calls": one_calls,
        "concurrent_seconds": round(many_s, 2),
        "concurrent_requests_per_s": round(len(chats) / many_s, 3),
        "concurrent_tokens_per_s": round(many_tokens / many_s, 2),
        "concurrent_generate_calls": many_calls,
        "concurrent_mean_batch_size": round(many_requests / max(many_calls, 1), 2),
        "speedup_tokens_per_s": round((many_tokens / many_s) / (one_tokens / one_s), 2),
        "completion_tokens": {"one_client": one_tokens, "concurrent": many_tokens},
        "identical_greedy_answers": f"{same}/{len(chats)}",
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    line = (
        f"| serve | {len(chats)} chat requests, {result['mean_prompt_tokens']:.0f}-token prompts, up to "
        f"{args.new_tokens} new tokens, greedy | one client at a time: {result['one_client_requests_per_s']} req/s, "
        f"{result['one_client_tokens_per_s']} tok/s | {args.clients} clients: "
        f"{result['concurrent_requests_per_s']} req/s, "
        f"{result['concurrent_tokens_per_s']} tok/s (mean batch {result['concurrent_mean_batch_size']}) "
        f"| **{result['speedup_tokens_per_s']}x** | identical greedy: {result['identical_greedy_answers']} |"
    )
    (RESULTS / "serve.md").write_text(
        "| benchmark | workload | baseline | cai | ratio | check |\n|---|---|---|---|---|---|\n" + line + "\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
