"""Benchmark: the ``critique`` stage against the same steps written with batched ``model.generate``.

cai's side is `cai.stages.critique.run_critique_revision` in the paper's mode (``critique_revision``,
one candidate per round): each step (initial answers, then per round the critiques and the
revisions) is one batched call over the chunk, and the constitution's few-shot examples, which
open every critique and revision prompt, are prefilled once and their KV cache reused.

The baseline is what a careful user would write to get the same data with transformers alone,
step for step: the same prompts built by `cai.prompts` (chat or text form, as the stage picks),
the same principles (`sample_critique_principles`, same seed and row ids), the same stop strings
(`CHAT_STOP_STRINGS`, given to ``generate`` as ``stop_strings=`` with ``tokenizer=``), the same
token budget per step, greedy; ``model.generate`` over left-padded batches of the backend's batch
size (`common.batched_generate`). After decoding it applies what the stage applies: the cut at the
first stop string, `clean_output`, and `revision_problem` to keep the previous answer when a
revision is unusable. Its final texts are compared with the stage's (and its initial answers and
critiques, to show where any difference starts). Rows/min count prompts carried through every
round. Figures go to bench/results/critique_revision.{json,md}.

    HF_HUB_OFFLINE=1 python bench/critique_revision.py            # 8 prompts x 1 round, ~3 minutes on 2 CPU cores
    HF_HUB_OFFLINE=1 python bench/critique_revision.py --quick    # writes critique_revision.quick.{json,md}
    HF_HUB_OFFLINE=1 python bench/critique_revision.py --prompts 16 --rounds 2 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common

FULL = {"prompts": 8, "rounds": 1, "new_tokens": 32, "batch_size": 16}
QUICK = {"prompts": 2, "rounds": 1, "new_tokens": 8, "batch_size": 16}


@dataclass
class Traces:
    """Each prompt's texts, step by step, as either side produced them."""

    initial: list[str]
    critiques: list[list[str]] = field(default_factory=list)
    """One list per round."""
    final: list[str] = field(default_factory=list)


def hf_critique_revision(backend: Any, rows: list, constitution: Any, config: Any, seed: int) -> Traces:
    """The critique stage's steps with batched ``model.generate`` (see the module docstring).

    Args:
        backend: cai's HFBackend, used only for its model, tokenizer, chat-template render, encode,
            EOS ids and batch size, so both sides feed the model the same token ids.
        config: the stage's `CritiqueConfig` (greedy sampling, mode ``critique_revision``).
    """
    from cai import prompts as P
    from cai.backends.base import cut_at_stop
    from cai.constitution import sample_critique_principles
    from cai.stages.critique import revision_problem

    model, tok = backend.model, backend.tokenizer
    stop = list(P.CHAT_STOP_STRINGS)

    def generate(prompts: list, max_new_tokens: int) -> list[str]:
        ids = backend.encode([backend.render(p) for p in prompts])
        out = common.batched_generate(model, ids, batch_size=backend.batch_size, max_new_tokens=max_new_tokens,
                                      eos_ids=sorted(backend.eos_ids), pad_id=backend.pad_id,
                                      stop_strings=stop, tokenizer=tok)
        return [P.clean_output(cut_at_stop(tok.decode(t, skip_special_tokens=True), stop)[0]) for t in out]

    chat = P.use_chat_format(config.prompt_format, backend)
    critique_prompt = P.critique_chat if chat else P.critique_text
    revision_prompt = P.revision_chat if chat else P.revision_text
    principles = [sample_critique_principles(constitution, config.rounds, seed, r.id) for r in rows]
    traces = Traces(initial=generate([r.messages for r in rows], config.response.max_new_tokens))
    current = list(traces.initial)
    for k in range(config.rounds):
        asks = [critique_prompt(constitution, r.messages, cur, p[k]) for r, cur, p in zip(rows, current, principles)]
        critiques = generate(asks, config.critique_sampling.max_new_tokens)
        revisions = generate([revision_prompt(a, c, p[k]) for a, c, p in zip(asks, critiques, principles)],
                             config.revision_sampling.max_new_tokens)
        current = [cur if revision_problem(rev, previous=cur, critique=c, constitution=constitution) else rev
                   for cur, rev, c in zip(current, revisions, critiques)]
        traces.critiques.append(critiques)
    traces.final = current
    return traces


def cai_critique_revision(backend: Any, rows: list, constitution: Any, config: Any, seed: int) -> Traces:
    """The stage itself, from a cold prefix cache (the few-shot prefill is timed)."""
    from cai.stages.critique import run_critique_revision

    backend.prefix_cache.clear()
    with tempfile.TemporaryDirectory() as tmp:
        out = run_critique_revision(rows, constitution=constitution, backend=backend, config=config,
                                    out_path=Path(tmp) / "data.jsonl", seed=seed, show_progress=False)
    by_id = {r["id"]: r for r in out}
    ordered = [by_id[r.id] for r in rows]
    return Traces(initial=[r["initial_response"] for r in ordered],
                  critiques=[[r["rounds"][k]["critique"] for r in ordered] for k in range(config.rounds)],
                  final=[r["final_response"] for r in ordered])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--prompts", type=int, help=f"red-team prompts (default {FULL['prompts']}; --quick {QUICK['prompts']})")
    parser.add_argument("--rounds", type=int, help=f"critique/revision rounds (default {FULL['rounds']})")
    parser.add_argument("--new-tokens", type=int, help=f"max new tokens per step (default {FULL['new_tokens']})")
    parser.add_argument("--batch-size", type=int, help=f"rows per batch on both sides (default {FULL['batch_size']})")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, to check the bench runs; writes critique_revision.quick.*")
    args = parser.parse_args()
    sizes = {k: getattr(args, k) or v for k, v in (QUICK if args.quick else FULL).items()}
    common.set_threads(args.threads)

    from cai import prompts as P
    from cai.backends.hf import HFBackend
    from cai.config import CritiqueConfig, SamplingConfig
    from cai.constitution_yaml import load_constitution
    from cai.data import load_prompts
    from cai.types import SamplingParams

    started = time.perf_counter()
    backend = HFBackend.from_spec(args.model, batch_size=sizes["batch_size"], dtype="float32", device="cpu")
    constitution = load_constitution("default")
    rows, _ = load_prompts("red-team", limit=sizes["prompts"])
    greedy = SamplingConfig(max_new_tokens=sizes["new_tokens"], temperature=0.0)
    config = CritiqueConfig(rounds=sizes["rounds"], chunk_size=len(rows), response=greedy, critique_sampling=greedy,
                            revision_sampling=greedy, mode="critique_revision", candidates=1)
    first_prompt = P.critique_chat(constitution, rows[0].messages, "", constitution.critique_revision_principles[0])

    # Warm both paths (and transformers' stop-string tables) on a short prompt.
    hi = [{"role": "user", "content": "Hi"}]
    backend.generate([hi], SamplingParams(max_new_tokens=2))
    common.batched_generate(backend.model, backend.encode([backend.render(hi)]), batch_size=1, max_new_tokens=2,
                            eos_ids=sorted(backend.eos_ids), pad_id=backend.pad_id,
                            stop_strings=list(P.CHAT_STOP_STRINGS), tokenizer=backend.tokenizer)

    timings = {}
    start = time.perf_counter()
    cai = cai_critique_revision(backend, rows, constitution, config, seed=0)
    timings["cai"] = time.perf_counter() - start
    start = time.perf_counter()
    hf = hf_critique_revision(backend, rows, constitution, config, seed=0)
    timings["hf"] = time.perf_counter() - start

    per_min = {k: 60 * len(rows) / s for k, s in timings.items()}
    ratio = per_min["cai"] / per_min["hf"]
    baseline = f"batched model.generate (batch {sizes['batch_size']}) rows/min"
    critiques = ", ".join(f"round {k + 1} critiques {common.same_count(c, h)}"
                          for k, (c, h) in enumerate(zip(cai.critiques, hf.critiques)))
    result_rows = [
        common.row("cai critique stage rows/min", per_min["cai"], "rows/min",
                   f"identical final text {common.same_count(cai.final, hf.final)} (initial answers "
                   f"{common.same_count(cai.initial, hf.initial)}, {critiques}); {timings['cai']:.1f} s",
                   ratio_vs={baseline: ratio}, target=">= 5x batched model.generate", met=ratio >= 5),
        common.row(baseline, per_min["hf"], "rows/min",
                   f"{timings['hf']:.1f} s; stop_strings= in generate, then cut_at_stop, clean_output, revision_problem"),
    ]
    notes = [
        f"Each critique prompt opens with the constitution's {len(constitution.critique_revision_examples)} few-shot "
        f"examples ({backend.count_tokens(first_prompt)} tokens for the first row's critique prompt with an empty answer).",
        "The baseline uses cai's chat-template render and encode, so both sides feed the model the same token ids; "
        "it is timed after cai, the model and threads already warm.",
        f"Whole bench took {time.perf_counter() - started:.0f} s" + (" (--quick: not final figures)" if args.quick else ""),
    ]
    workload = (f"{args.model}, fp32 CPU: {len(rows)} red-team prompts x {sizes['rounds']} critique/revision round(s), "
                f"<= {sizes['new_tokens']} new tokens per step, greedy, batch {sizes['batch_size']}")
    out = common.result("critique_revision", args.quick, workload, result_rows, notes)
    common.write_results(out, common.stem("critique_revision", args.quick))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
