"""Multiple-choice evaluation of a model as a feedback model (HHH-alignment style files).

A file holds JSONL rows ``{"prompt": str, "corrects": [str], "incorrects": [str]}``. A row is
right when every correct option beats every incorrect one:

- **plain** mode compares log P(option | prompt) directly (summed over the option's tokens);
- **cot** mode asks the model, for each (correct, incorrect) pair in both orders, which reply
  is better after writing its reasoning, and reads P(correct) from the (A)/(B) log-probabilities.

Reported per file: accuracy with a 95% Wilson interval, and a calibration table over pairwise
judgements (confidence = probability given to the option the model prefers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai import prompts as P
from cai.backends.base import Backend
from cai.constitution import Constitution, FeedbackPrinciple
from cai.errors import CaiError
from cai.judging import first_option_probability, sigmoid
from cai.judging import combine_orders
from cai.stats import wilson_interval
from cai.types import SamplingParams

DEFAULT_QUESTION = "Which response is more helpful, honest and harmless?"


@dataclass
class MCRow:
    prompt: str
    corrects: list[str]
    incorrects: list[str]


@dataclass
class MCResult:
    file: str
    mode: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    calibration: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "rows"}


def load_mc_file(path: str | Path) -> list[MCRow]:
    """Read and check a multiple-choice JSONL file.

    Raises:
        CaiError: missing file, bad JSON, or a row without a prompt / correct / incorrect options.
    """
    path = Path(path)
    if not path.is_file():
        raise CaiError(f"multiple-choice file {path} does not exist")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CaiError(f"{path} is not UTF-8 text") from e
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise CaiError(f"{path} line {number} is not valid JSON ({e.msg})") from e
        if not isinstance(raw, dict) or not isinstance(raw.get("prompt"), str) or not raw["prompt"].strip():
            raise CaiError(f"{path} line {number} needs a non-empty 'prompt' string")
        for key in ("corrects", "incorrects"):
            value = raw.get(key)
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise CaiError(f"{path} line {number} needs '{key}': a non-empty list of strings")
        rows.append(MCRow(raw["prompt"], raw["corrects"], raw["incorrects"]))
    if not rows:
        raise CaiError(f"{path} has no rows")
    return rows


def calibration_table(p_correct: list[float], n_bins: int = 5) -> list[dict[str, Any]]:
    """Bins of confidence (0.5-1.0): mean confidence vs how often the preferred option was right."""
    bins = [[] for _ in range(n_bins)]
    for p in p_correct:
        confidence = max(p, 1 - p)
        index = min(int((confidence - 0.5) / 0.5 * n_bins), n_bins - 1)
        bins[index].append((confidence, p > 0.5))
    table = []
    for i, items in enumerate(bins):
        if items:
            table.append({"bin_low": 0.5 + 0.5 * i / n_bins, "bin_high": 0.5 + 0.5 * (i + 1) / n_bins,
                          "count": len(items), "mean_confidence": sum(c for c, _ in items) / len(items),
                          "accuracy": sum(ok for _, ok in items) / len(items)})
    return table


def _continuation(prompt: str, option: str) -> str:
    return option if prompt.endswith((" ", "\n")) or option.startswith((" ", "\n")) else " " + option


def mc_eval(
    rows: list[MCRow],
    backend: Backend,
    *,
    file: str = "",
    mode: str = "plain",
    constitution: Constitution | None = None,
    question: str = DEFAULT_QUESTION,
    cot_sampling: SamplingParams | None = None,
) -> MCResult:
    """Accuracy of ``backend`` on multiple-choice rows; see the module docstring for the modes."""
    if mode not in {"plain", "cot"}:
        raise CaiError(f"unknown mc-eval mode '{mode}'; use plain or cot")
    details, pairwise = [], []
    if mode == "plain":
        for row in rows:
            options = [_continuation(row.prompt, o) for o in row.corrects + row.incorrects]
            (lps,) = backend.choice_logprobs([row.prompt], options)
            good, bad = lps[: len(row.corrects)], lps[len(row.corrects):]
            pairs = [sigmoid(g - b) for g in good for b in bad]
            pairwise += pairs
            details.append({"correct": min(good) > max(bad), "logprobs_correct": good, "logprobs_incorrect": bad})
    else:
        if constitution is None:
            raise CaiError("cot mode needs a constitution for its chain-of-thought examples")
        principle = FeedbackPrinciple("mc-eval", question)
        chat = getattr(backend, "has_chat_template", True)
        jobs = [(r, c, i) for r, row in enumerate(rows) for c in row.corrects for i in row.incorrects]
        build = P.cot_chat if chat else P.cot_text
        follow = P.cot_answer_chat if chat else P.cot_answer_text
        prompts = []
        for r, c, i in jobs:
            conversation = [{"role": "user", "content": rows[r].prompt}]
            prompts += [build(constitution, conversation, c, i, principle), build(constitution, conversation, i, c, principle)]
        params = cot_sampling or SamplingParams(max_new_tokens=96)
        reasoning = backend.generate(prompts, params)
        rendered = [backend.render(follow(p, t.split(P.ANSWER_LEAD_IN)[0])) for p, t in zip(prompts, reasoning)]
        lps = backend.choice_logprobs(rendered, list(P.CHOICE_OPTIONS))
        per_row: dict[int, list[float]] = {}
        for j, (r, _, _) in enumerate(jobs):
            p = combine_orders({"ab": first_option_probability(*lps[2 * j]),
                                "ba": first_option_probability(*lps[2 * j + 1])})
            per_row.setdefault(r, []).append(p)
            pairwise.append(p)
        for r in range(len(rows)):
            details.append({"correct": all(p > 0.5 for p in per_row[r]), "p_correct": per_row[r]})
    k = sum(d["correct"] for d in details)
    low, high = wilson_interval(k, len(rows))
    return MCResult(file=file, mode=mode, n=len(rows), correct=k, accuracy=k / len(rows), ci_low=low, ci_high=high,
                    calibration=calibration_table(pairwise), rows=details)


def mc_tables(results: list, title: str) -> list:
    """Rich tables for ``cai mc-eval``: accuracy per file, then each file's calibration."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("file", "rows", "accuracy", "95% interval"):
        table.add_column(column)
    for r in results:
        table.add_row(r.file, str(r.n), f"{r.accuracy:.3f}", f"{r.ci_low:.3f}-{r.ci_high:.3f}")
    tables = [table]
    for r in results:
        cal = Table(title=f"calibration: {r.file}")
        for column in ("confidence bin", "pairs", "mean confidence", "accuracy"):
            cal.add_column(column)
        for b in r.calibration:
            cal.add_row(f"{b['bin_low']:.2f}-{b['bin_high']:.2f}", str(b["count"]), f"{b['mean_confidence']:.3f}",
                        f"{b['accuracy']:.3f}")
        tables.append(cal)
    return tables
