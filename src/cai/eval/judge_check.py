"""The judge's own check: how often a feedback/judge model agrees with the human gold pairs.

The judge labels the gold pairs (`cai.data.gold`) with exactly the procedure `cai label` uses
(same prompts, both orders, (A)/(B) log-probabilities; `cai.stages.label.check_judge` runs it),
with the better answer put in slot A or B by a hash of the pair id. Agreement with the gold label,
with a Wilson interval, says how far the AI-judged numbers of a run can be trusted: an interval
that holds 50% means they are not evidence.
"""

from __future__ import annotations

from typing import Any, Sequence

from cai.backends.base import stable_seed
from cai.data.gold import GROUPS, GoldPair
from cai.stats import wilson_interval


def judge_pairs_from_gold(pairs: Sequence[GoldPair]) -> list[dict[str, Any]]:
    """Gold pairs as label-stage pairs; the better answer sits in slot A or B by a hash of its id."""
    rows = []
    for p in pairs:
        better_first = stable_seed(0, p.id, "gold-slot") % 2 == 0
        a, b = (p.better, p.worse) if better_first else (p.worse, p.better)
        rows.append({"id": f"gold:{p.id}", "gold_id": p.id, "kind": p.kind,
                     "set": "helpfulness" if p.kind == "helpfulness" else "red-team", "prompt": p.messages,
                     "response_a": a, "response_b": b, "better": "a" if better_first else "b"})
    return rows


def position_bias(rows: list[dict[str, Any]]) -> float | None:
    """Mean P(first option) - 0.5 over labels asked in both orders (0 = no bias; >0 favours first)."""
    values = [(e["p_first"]["ab"] + e["p_first"]["ba"]) / 2 for r in rows for e in r["per_principle"]
              if e["p_first"].get("ab") is not None and e["p_first"].get("ba") is not None]
    return round(sum(values) / len(values) - 0.5, 6) if values else None


def judge_agreement(labelled: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How often the judge's soft label favours the gold better answer, overall and by kind.

    A label of exactly 0.5 counts as half a success, and so does a pair the judge abstained on (it
    named neither answer): an abstention is a coin flip's worth, never a guess. Also the judge's
    position bias (mean P(first slot) - 0.5 over both orders), its mean confidence over the pairs
    it answered, and the number of abstentions.
    """

    def agree(r: dict[str, Any]) -> float:
        p_better = r["p_a"] if r["better"] == "a" else 1 - r["p_a"]
        return 1.0 if p_better > 0.5 else 0.5 if p_better == 0.5 else 0.0

    out: dict[str, Any] = {}
    for group in GROUPS:
        rows = [r for r in labelled if group == "all" or r["kind"] == group]
        if not rows:
            continue
        hits = sum(agree(r) for r in rows)
        low, high = wilson_interval(hits, len(rows))
        out[group] = {"pairs": len(rows), "agreement": hits / len(rows), "ci": (low, high)}
    total = out.get("all", {})
    out["trusted"] = bool(total) and total["ci"][0] > 0.5
    out["position_bias"] = position_bias(list(labelled))
    answered = [r for r in labelled if not r.get("abstained")]
    out["mean_confidence"] = (sum(max(r["p_a"], 1 - r["p_a"]) for r in answered) / len(answered)) if answered else None
    out["abstentions"] = len(labelled) - len(answered)
    return out
