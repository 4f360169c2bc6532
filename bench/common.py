"""What every benchmark in bench/ shares: the result format, the machine's matmul peak, and the
batched ``model.generate`` loop that is the baseline for cai's generation.

A result is one dict, written by `write_results` as ``bench/results/<stem>.json`` and a Markdown
twin ``<stem>.md``::

    {"benchmark": name, "commit": "abc1234[-dirty]", "date": "YYYY-MM-DD", "machine": {...},
     "workload": "one sentence", "rows": [row(...), ...], "notes": ["...", ...]}

Each row (see `row`) is one measured figure with its unit, its ratios against other rows (by row
name), a check that says the two sides did the same work (matching outputs, token counts), and
where there is one, the target and whether it was met. ``bench/table.py`` builds the README's
table from these files.

llama.cpp is an optional peer (``bench/llama_peer.py``): llama-cpp-python is not a cai dependency,
so its rows run only where it is installed and otherwise say why they did not.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from cai.padding import pad_rows

RESULTS = Path(__file__).parent / "results"
"""The peer's version these benches were written against (its low-level API moves between releases)."""


def commit() -> str:
    """The short commit of this checkout, with ``-dirty`` when tracked files other than results have changes.

    bench/results is left out: each bench rewrites its own files there, which changes nothing measured.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)bench/results")
    return sha + ("-dirty" if changed else "")


def set_threads(threads: int | None) -> None:
    """Use ``threads`` torch threads (None: torch's own choice). 1 is steadier on a shared machine."""
    if threads:
        torch.set_num_threads(threads)


def machine(**versions: str) -> dict[str, Any]:
    """CPU, torch threads and library versions (transformers always; more as keyword arguments)."""
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, **versions}


def matmul_peak(size: int = 2048, repeats: int = 8) -> float:
    """Best fp32 FLOP/s of a square matmul on this process's torch threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def matmul_peak_samples(rounds: int = 5, size: int = 2048, repeats: int = 8) -> list[float]:
    """``rounds`` separate `matmul_peak` measurements (each the best of ``repeats``), for a median and a spread.

    One best-of-8 moved from 339 to 184 GFLOP/s between two runs on the same machine; a bench
    takes samples before and after its rows and divides by their median, printing the range.
    """
    return [matmul_peak(size, repeats) for _ in range(rounds)]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def row(name: str, figure: float, unit: str, check: str, *, ratio_vs: dict[str, float] | None = None,
        target: str | None = None, met: bool | None = None) -> dict[str, Any]:
    """One result row.

    Args:
        name: what was measured, unique within the result ("cai HFBackend.generate tokens/s").
        figure: the measurement, in ``unit``.
        check: evidence that the compared sides did the same work (outputs compared, counts).
        ratio_vs: this row's figure over other rows' figures, keyed by their names; the first one
            is the comparison the target is about.
        target: the goal as written in the issue (">= 6x batched generate"), or None.
        met: whether the figure meets ``target`` (None when there is no target).
    """
    return {"row": name, "figure": round(figure, 4 if abs(figure) < 10 else 1), "unit": unit,
            "ratio_vs": {k: round(v, 3) for k, v in (ratio_vs or {}).items()}, "check": check,
            "target": target, "met": met}


def result(benchmark: str, quick: bool, workload: str, rows: list[dict[str, Any]], notes: list[str],
           **versions: str) -> dict[str, Any]:
    """A result dict stamped with this checkout's commit, today's date and the machine."""
    return {"benchmark": benchmark + (" (quick)" if quick else ""), "commit": commit(),
            "date": time.strftime("%Y-%m-%d"), "machine": machine(**versions), "workload": workload,
            "rows": rows, "notes": notes}


def write_results(result: dict[str, Any], stem: str) -> None:
    """``<stem>.json`` and its ``<stem>.md`` twin under bench/results."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {result['benchmark']} ({result['commit']}, {result['date']})", "", result["workload"], "",
             "| row | figure | unit | ratio | check | target | met |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = ", ".join(f"{v}x {k}" for k, v in r["ratio_vs"].items())
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['row']} | {r['figure']} | {r['unit']} | {ratio} | {r['check']} | {r['target'] or ''} | {met} |")
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()), ""]
    lines += [f"- {n}" for n in result["notes"]]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def stem(name: str, quick: bool) -> str:
    """The results file stem: ``<name>`` or ``<name>.quick`` (quick runs never overwrite real results)."""
    return f"{name}.quick" if quick else name


def same_count(ours: Sequence[str], theirs: Sequence[str]) -> str:
    """``"k/n"``: how many of two output lists are identical, position by position."""
    return f"{sum(a == b for a, b in zip(ours, theirs))}/{len(ours)}"


@torch.inference_mode()
def batched_generate(model: Any, rows: Sequence[Sequence[int]], *, batch_size: int, max_new_tokens: int,
                     eos_ids: Sequence[int], pad_id: int, **generate_kwargs: Any) -> list[list[int]]:
    """What a careful user runs instead of cai's loop: greedy ``model.generate`` over left-padded batches.

    Rows are sorted longest first (as cai sorts them, so both sides pad alike), cut into batches of
    ``batch_size``, left-padded with an attention mask (transformers derives position ids from
    it), and generated with transformers' default KV cache.

    Args:
        rows: prompt token ids, exactly those cai feeds its own loop.
        eos_ids: every id that ends a row (the same set cai stops on).
        generate_kwargs: passed on (``stop_strings=..., tokenizer=...``).

    Returns:
        Each row's new token ids in input order, up to (without) its first EOS id.
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[list[int]] = [[] for _ in rows]
    ends = set(eos_ids)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        ids, mask = pad_rows([rows[i] for i in batch], pad_id, "left")
        width = ids.shape[1]
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=sorted(ends), pad_token_id=pad_id, **generate_kwargs)
        for b, i in enumerate(batch):
            new = generated[b, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in ends), len(new))
            out[i] = new[:cut]
    return out
