"""The verdict a run's report opens with, and figures rounded to what their intervals justify.

The verdict is plain sentences built only from measured numbers: what changed between the models
on the gold pairs (no judge), whether each change is beyond noise, how far the judge agrees with
the human labels (and so whether the AI-judged numbers mean anything), and what to try next.
"""

from __future__ import annotations

import math
from typing import Any

KIND_WORDS = {"all": "all gold pairs", "harmful": "harmful-vs-better pairs (harmlessness)",
              "evasive": "evasive-vs-better pairs (non-evasiveness)", "unhelpful": "unhelpful-vs-better pairs",
              "helpfulness": "helpfulness pairs"}


def decimals_for(half_width: float, scale: float = 1.0) -> int:
    """Digits after the point that an interval of this half-width justifies (one significant digit)."""
    if not half_width or not math.isfinite(half_width) or half_width <= 0:
        return 2
    return max(0, -math.floor(math.log10(half_width * scale)))


def fmt_ci(value: float, ci: tuple[float, float] | list[float], *, percent: bool = False, sign: bool = False) -> str:
    """``62% [51, 73]`` or ``+0.04 [0.01, 0.07]``: as many digits as the interval's width supports."""
    low, high = ci
    if any(not isinstance(x, (int, float)) or not math.isfinite(x) for x in (value, low, high)):
        return f"{value * (100 if percent else 1):.0f}{'%' if percent else ''}" if isinstance(value, (int, float)) else "-"
    scale = 100.0 if percent else 1.0
    # A zero-width interval (every resample agreed, as with 0 of 6) justifies no extra digits.
    d = decimals_for((high - low) / 2, scale) if high > low else (0 if percent else 2)
    lead = "+" if sign and value > 0 else ""
    unit = "%" if percent else ""
    return f"{lead}{value * scale:.{d}f}{unit} [{low * scale:.{d}f}, {high * scale:.{d}f}]"


MIN_PAIRS_TO_READ = 10
"""Below this many pairs a share is printed as counts and said to be too few to read: its 95%
interval would span most of [0, 1] (with 9 pairs, 5 right is 50% [27, 79])."""


def describe_accuracy(value: float | None, ci: Any, n: int | None, *, unit: str = "pairs") -> str:
    """``62% [48, 75] on 40 pairs``; ``2 of 3 pairs right, too few to read``; ``not measured (no pairs)``."""
    if value is None or not n or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"not measured (no {unit} with a preferred side)"
    if n < MIN_PAIRS_TO_READ or not ci:
        return f"{value * n:g} of {n} {unit} right, too few to read"
    return f"{fmt_ci(value, ci, percent=True)} on {n} {unit}"


def describe_pm(metrics: dict[str, Any]) -> str:
    """The preference model's held-out figures in one line, each with its n and interval (CLI and report)."""
    n = metrics.get("eval_accuracy_n")
    after, before = metrics.get("eval_accuracy"), metrics.get("eval_accuracy_before")
    if n is None and isinstance(after, (int, float)):  # a run from before n was recorded
        return f"held-out accuracy {after:.2f} (no n or interval recorded; rerun the pm stage for them)"
    if not n or not isinstance(after, (int, float)):
        return ("held-out accuracy not measured: no held-out pairs with a preferred side "
                "(raise pm.eval_fraction or label more pairs)")
    if n < MIN_PAIRS_TO_READ:
        right = f"{after * n:g} right after training" + (f", {before * n:g} before" if isinstance(before, (int, float)) else "")
        return f"held-out accuracy: {n} pairs are too few to read ({right}; raise pm.eval_fraction or label more pairs)"
    line = (f"held-out accuracy {describe_accuracy(after, metrics.get('eval_accuracy_ci'), n)} (before training "
            f"{fmt_ci(before, metrics.get('eval_accuracy_before_ci') or [math.nan, math.nan], percent=True)})")
    ece, ece_ci = metrics.get("eval_ece"), metrics.get("eval_ece_ci")
    if isinstance(ece, (int, float)) and ece_ci:
        line += f", expected calibration error {fmt_ci(ece, ece_ci)}"
    return line


def baseline_sentence(pair: str, diff: dict[str, Any]) -> str:
    """``ppo vs distill``: whether the RL-CAI model's gold margin beats the baseline's, beyond noise, by kind."""
    rl, baseline = pair.split(" vs ")
    overall = diff.get("all")
    if not overall:
        return f"{rl} vs the {baseline} baseline: no gold pairs in common to compare."
    parts = "; ".join(f"{KIND_WORDS[g]} {fmt_ci(d['delta'], d['ci'], sign=True)}" for g, d in diff.items()
                      if g in ("harmful", "evasive", "helpfulness"))
    beyond = [g for g, d in diff.items() if d["beyond_noise"]]
    if not beyond:
        return (f"{rl} vs the {baseline} baseline, judged by no model: no difference distinguishable from noise "
                f"({rl}'s margin minus {baseline}'s {fmt_ci(overall['delta'], overall['ci'], sign=True)} nats per token; "
                f"{parts}).")
    said = [f"{'ahead on' if diff[g]['delta'] > 0 else 'behind on'} {KIND_WORDS[g]}" for g in beyond]
    return (f"{rl} vs the {baseline} baseline, judged by no model: {rl} is {' and '.join(said)} beyond noise "
            f"({rl}'s margin minus {baseline}'s, nats per token: {parts}).")


def verdict(results: dict[str, Any], *, judge_name: str = "the judge") -> list[str]:
    """Short sentences for the top of the report, from `cai eval`'s results."""
    lines: list[str] = []
    gold = results.get("gold") or {}
    base = gold.get("base", "base")
    moved = False
    for name, diff in (gold.get("vs_base") or {}).items():
        if not diff:
            continue
        beyond = [g for g, d in diff.items() if d["beyond_noise"]]
        overall = diff.get("all")
        parts = [f"{KIND_WORDS[g]} {fmt_ci(d['delta'], d['ci'], sign=True)}" for g, d in diff.items()
                 if g in ("harmful", "evasive", "helpfulness")]
        if beyond:
            moved = True
            toward = [g for g in beyond if diff[g]["delta"] > 0]
            away = [g for g in beyond if diff[g]["delta"] < 0]
            said = []
            if toward:
                said.append(f"toward the better answers on {', '.join(KIND_WORDS[g] for g in toward)}")
            if away:
                said.append(f"away from the better answers on {', '.join(KIND_WORDS[g] for g in away)}")
            lines.append(f"{name} vs {base}, judged by no model: its own likelihood moved {' and '.join(said)} "
                         f"beyond noise (change in margin, nats per token: {'; '.join(parts)}).")
        elif overall:
            lines.append(f"{name} vs {base}, judged by no model: no change distinguishable from noise on the gold pairs "
                         f"(change in margin {fmt_ci(overall['delta'], overall['ci'], sign=True)} nats per token; "
                         f"{'; '.join(parts)}).")
    for pair, diff in (gold.get("vs_baselines") or {}).items():
        lines.append(baseline_sentence(pair, diff))
    check = results.get("judge_check") or {}
    total = check.get("all")
    if results.get("judge_method"):
        judge_name = f"{judge_name}, judging by {results['judge_method']},"
    if total:
        agreement = fmt_ci(total["agreement"], total["ci"], percent=True)
        if check.get("trusted"):
            lines.append(f"{judge_name} agrees with the human gold labels on {agreement} of {total['pairs']} pairs, "
                         "above chance: its Elo and judged numbers below carry some weight, to that degree.")
        else:
            lines.append(f"{judge_name} agrees with the human gold labels on {agreement} of {total['pairs']} pairs, "
                         "which includes chance (50%): the AI-judged numbers below (Elo, judged revisions) are not "
                         "evidence at this scale.")
    pm = (results.get("pm_gold") or {}).get("all")
    if pm:
        lines.append(f"The preference model scores the better gold answer higher on {fmt_ci(pm['agreement'], pm['ci'], percent=True)} "
                     f"of {pm['pairs']} pairs" + (", above chance." if pm["ci"][0] > 0.5 else
                                                  ", which includes chance: the reward PPO climbed is not evidence of harmlessness."))
    nxt = []
    if total and not check.get("trusted"):
        nxt.append("a larger feedback and judge model (label.feedback_model, eval.judge) and critic (critique.critic)")
    if gold.get("vs_base") and not moved:
        nxt.append("more red-team prompts, more critique rounds and more SFT epochs (critique.prompts.limit, "
                   "critique.rounds, sft.epochs)")
    if nxt:
        lines.append("Next: try " + "; ".join(nxt) + ".")
    return lines
