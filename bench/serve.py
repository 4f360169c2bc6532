"""Benchmark: ``cai serve`` answering 32 concurrent clients vs one client at a time.

The same server (in this process, on a loopback port, the `cai serve` defaults) gets the same
requests twice, through the official ``openai`` client: first one after another (each request
runs alone, the baseline a user gets without concurrency), then from 32 clients at once (the
batcher gathers them into shared ``generate`` calls). The requests are greedy, so the two modes
should give the same answers; the table says how many did, so the ratio measures one thing.
Figures go to bench/results/serve.{json,md}.

    python bench/serve.py                       # bundled model, 32 requests, a few minutes on 2 CPU cores
    python bench/serve.py --quick               # 2 requests from 2 clients; writes serve.quick.{json,md}
    python bench/serve.py --model path/to/model --requests 64 --new-tokens 64
    python bench/serve.py --threads 1           # on a machine shared with other work
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import common
import openai

from cai.backends.hf import HFBackend
from cai.data import load_prompts
from cai.serve.server import serve_app

FULL = {"requests": 32, "clients": 32, "new_tokens": 32}
QUICK = {"requests": 2, "clients": 2, "new_tokens": 8}


def ask(url: str, model: str, chats: list, new_tokens: int) -> list[tuple[str, int]]:
    """Send ``chats`` one after another from one client; (text, completion tokens) for each."""
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) as client:
        replies = [client.chat.completions.create(model=model, messages=chat, max_tokens=new_tokens, temperature=0)
                   for chat in chats]
    return [(r.choices[0].message.content, r.usage.completion_tokens) for r in replies]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--requests", type=int, help=f"Requests per mode, the same ones in both (default {FULL['requests']}).")
    parser.add_argument("--clients", type=int, help=f"Concurrent clients in the second mode (default {FULL['clients']}).")
    parser.add_argument("--new-tokens", type=int, help=f"max_tokens per request (default {FULL['new_tokens']}).")
    parser.add_argument("--max-batch", type=int, default=16, help="The server's batch limit (cai serve's default).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own); 1 is steadier on a machine shared with other work.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the bench runs; writes serve.quick.*")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        setattr(args, key, getattr(args, key) or value)
    common.set_threads(args.threads)

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
    one_tps, many_tps = one_tokens / one_s, many_tokens / many_s
    mean_batch = many_requests / max(many_calls, 1)
    baseline = "one client at a time tokens/s"
    result_rows = [
        common.row(f"{args.clients} concurrent clients tokens/s", many_tps, "tokens/s",
                   f"identical greedy answers {common.same_count([a for a, _ in many], [a for a, _ in one])}; "
                   f"{len(chats) / many_s:.3f} requests/s, {many_tokens} tokens in {many_s:.1f} s, "
                   f"{many_calls} generate calls (mean batch {mean_batch:.2f})",
                   ratio_vs={baseline: many_tps / one_tps}),
        common.row(baseline, one_tps, "tokens/s",
                   f"{len(chats) / one_s:.3f} requests/s, {one_tokens} tokens in {one_s:.1f} s, {one_calls} generate calls"),
    ]
    notes = [
        f"Prompts average {sum(prompt_tokens) / len(prompt_tokens):.0f} tokens; the server batches up to "
        f"{args.max_batch} requests per generate call; requests go through the openai client over loopback HTTP.",
    ]
    workload = (f"{args.model} behind cai serve: {len(chats)} helpfulness chat requests, <= {args.new_tokens} new tokens, "
                f"greedy; one client at a time, then {args.clients} clients at once")
    out = common.result("serve", args.quick, workload, result_rows, notes, openai=openai.__version__)
    common.write_results(out, common.stem("serve", args.quick))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
