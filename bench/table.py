"""Build the README's benchmark table from bench/results/*.json (never the ``*.quick.*`` files).

One table row per headline of each result: a row that has a target or a ratio against another
row. It shows the workload, the baseline (the first row named in its ``ratio_vs``, the one the
target is about) and its figure, cai's figure with its check (the outputs compared), the ratio
(further ratios in brackets), the target, whether it was met, and the commit and date the result
came from, so a reader sees how old each figure is.

    python bench/table.py           # print the table
    python bench/table.py --write   # replace the block between the markers in README.md with it

``--write`` rewrites only what lies between ``<!-- bench-table -->`` and ``<!-- /bench-table -->``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
START, END = "<!-- bench-table -->", "<!-- /bench-table -->"
ORDER = ("generation", "critique_revision", "feedback", "serve", "training")
"""Benchmarks in this order first, any others after them by name."""


def load_results(folder: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(name, result) for each full result in ``folder``, and a warning per file left out."""
    found, warnings = [], []
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(".quick.json"):
            continue
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            warnings.append(f"{path} is not valid JSON ({e}); rerun the bench that writes it")
            continue
        if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
            warnings.append(f"{path} predates the rows format; rerun bench/{path.stem}.py to include it")
            continue
        found.append((path.stem, result))
    rank = {name: i for i, name in enumerate(ORDER)}
    found.sort(key=lambda item: (rank.get(item[0], len(ORDER)), item[0]))
    return found, warnings


def cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def headline_rows(name: str, result: dict[str, Any]) -> list[list[str]]:
    """The table rows for one result: one per row with a target or a ratio."""
    figures = {r["row"]: r for r in result["rows"]}
    out = []
    for r in result["rows"]:
        if not r.get("target") and not r.get("ratio_vs"):
            continue
        ratios = list(r.get("ratio_vs", {}).items())
        if ratios:
            first, value = ratios[0]
            known = figures.get(first)
            baseline = f"{first}: {known['figure']} {known['unit']}" if known else first
            more = ", ".join(f"{v}x vs {k}" for k, v in ratios[1:])
            ratio = f"**{value}x**" + (f" ({more})" if more else "")
        else:
            baseline, ratio = "", ""
        met = "" if r.get("met") is None else ("yes" if r["met"] else "**no**")
        out.append([f"`{name}.py`", result["workload"], baseline, f"{r['row']}: {r['figure']} {r['unit']} ({r['check']})",
                    ratio, r.get("target") or "", met, f"{result['commit']}, {result['date']}"])
    return out


def table(results: list[tuple[str, dict[str, Any]]]) -> str:
    """The Markdown table for ``results`` (a header and no rows when there are none)."""
    lines = ["| benchmark | workload | baseline | cai | ratio | target | met | from |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in results:
        lines += ["| " + " | ".join(cell(c) for c in cells) + " |" for cells in headline_rows(name, result)]
    return "\n".join(lines)


def replace_block(text: str, block: str, where: Path) -> str:
    """``text`` with what lies between the markers replaced by ``block``.

    Raises:
        SystemExit: the markers are missing, repeated or out of order (one sentence saying so).
    """
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{where} needs exactly one {START} line followed by one {END} line around the benchmark "
                         "table; add them where the table goes and rerun with --write.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the table block in the README instead of printing")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="folder of result JSON files")
    parser.add_argument("--readme", type=Path, default=HERE.parent / "README.md", help="the file --write rewrites")
    args = parser.parse_args()

    results, warnings = load_results(args.results)
    for warning in warnings:
        print(f"table.py: {warning}", file=sys.stderr)
    if not results:
        raise SystemExit(f"{args.results} holds no results in the rows format; run the benches in bench/ first.")
    block = table(results)
    if not args.write:
        print(block)
        return
    text = args.readme.read_text()
    args.readme.write_text(replace_block(text, block, args.readme))
    print(f"table.py: wrote {len(block.splitlines()) - 2} rows into {args.readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
