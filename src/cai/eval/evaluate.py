"""``cai eval``: compare models on harmlessness and helpfulness, side by side.

For each model (by default the run's starting model, SL-CAI, RL-CAI PPO and RL-CAI DPO, those
that exist): greedy answers to held-out red-team and helpfulness prompts. A judge model compares
every pair of models' answers to each prompt, in both orders, under harmlessness principles (red-
team prompts) and the helpfulness question (helpfulness prompts); a Bradley-Terry fit gives an
Elo per model and axis with bootstrap intervals. Also: preference-model scores, answer length,
the evasive-refusal rate, the revision curve (mean PM score after each critique round) and
per-principle statistics from the SL traces.

Outputs in ``eval/``: ``responses.jsonl`` (resumable), ``judgements.jsonl``, ``results.json`` and
``results.md``.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path
from typing import Any

from cai.backends.base import Backend
from cai.config import LabelConfig
from cai.constitution import Constitution, FeedbackPrinciple
from cai.data import PromptRow
from cai.eval.elo import Comparison, elo_table
from cai.eval.evasiveness import judge_evasiveness
from cai.io import JsonlWriter, read_jsonl
from cai.stages.critique_revision import clean_output
from cai.stages.feedback import label_pairs


def generate_answers(models: dict[str, Any], sets: dict[str, list[PromptRow]], out_path: Path, params: Any,
                     load: Any, show_progress: bool = True, chunk_size: int = 16) -> list[dict[str, Any]]:
    """Greedy answers of every model to every prompt; rows ``{model, set, id, prompt, response}``."""
    from cai.progress import progress_bar

    done = {(r["model"], r["set"], r["id"]) for r in read_jsonl(out_path, repair=True)}
    with JsonlWriter(out_path) as writer:
        for name, spec in models.items():
            todo = [(s, row) for s, rows in sets.items() for row in rows if (name, s, row.id) not in done]
            if not todo:
                continue
            backend = load(spec)
            with progress_bar(f"answers: {name}", len(todo), enabled=show_progress) as advance:
                for start in range(0, len(todo), chunk_size):  # written as they finish: a crash keeps them
                    chunk = todo[start:start + chunk_size]
                    texts = backend.generate([row.messages for _, row in chunk], params, progress=advance)
                    for (s, row), text in zip(chunk, texts):
                        writer.write({"model": name, "set": s, "id": row.id, "prompt": row.messages,
                                      "response": clean_output(text)})
            del backend
    return read_jsonl(out_path)


def judge_pairs(answers: list[dict[str, Any]], *, constitution: Constitution, judge: Backend, label_config: LabelConfig,
                out_path: Path, seed: int, show_progress: bool = True) -> list[dict[str, Any]]:
    """Pairwise judgements of every two models' answers to each prompt (both orders, soft)."""
    by_prompt: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for a in answers:
        by_prompt[(a["set"], a["id"])][a["model"]] = a
    pairs = []
    for (s, pid), per_model in by_prompt.items():
        for m1, m2 in itertools.combinations(sorted(per_model), 2):
            a, b = per_model[m1], per_model[m2]
            pairs.append({"id": f"{s}:{pid}:{m1}|{m2}", "source_id": f"{s}:{pid}", "set": s, "model_a": m1,
                          "model_b": m2, "prompt": a["prompt"], "response_a": a["response"], "response_b": b["response"]})
    return label_pairs(pairs, constitution=constitution, backend=judge, config=label_config, out_path=out_path,
                       seed=seed, helpfulness_principle=FeedbackPrinciple("helpfulness", label_config.helpfulness_question),
                       show_progress=show_progress)


def elo_by_axis(judgements: list[dict[str, Any]], anchor: str | None, n_bootstrap: int, seed: int) -> dict[str, list]:
    """Elo tables for the harmlessness (red-team prompts) and helpfulness axes."""
    tables = {}
    for axis, s in (("harmlessness", "red-team"), ("helpfulness", "helpfulness")):
        comparisons = [Comparison(j["model_a"], j["model_b"], j["p_a"], j["source_id"]) for j in judgements if j["set"] == s]
        if comparisons:
            models = {c.model_a for c in comparisons} | {c.model_b for c in comparisons}
            tables[axis] = elo_table(comparisons, anchor=anchor if anchor in models else None,
                                     n_bootstrap=n_bootstrap, seed=seed)
    return tables


def answer_stats(answers: list[dict[str, Any]], pm_scores: dict[int, float] | None) -> dict[str, dict[str, Any]]:
    """Per model: mean PM score per set, mean length in words, evasive-refusal rate on red-team prompts."""
    stats: dict[str, dict[str, Any]] = defaultdict(dict)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, a in enumerate(answers):
        groups[(a["model"], a["set"])].append(i)
    for (model, s), idx in groups.items():
        key = "red_team" if s == "red-team" else "helpfulness"
        stats[model][f"{key}_mean_words"] = round(sum(len(answers[i]["response"].split()) for i in idx) / len(idx), 2)
        if pm_scores is not None:
            stats[model][f"{key}_pm_score"] = round(sum(pm_scores[i] for i in idx) / len(idx), 4)
        if s == "red-team":
            verdicts = [judge_evasiveness(answers[i]["response"]) for i in idx]
            stats[model]["evasive_rate"] = round(sum(v.evasive for v in verdicts) / len(verdicts), 4)
            stats[model]["refusal_rate"] = round(sum(v.refuses for v in verdicts) / len(verdicts), 4)
    return dict(stats)


def revision_curve(traces: list[dict[str, Any]], scorer: Any) -> dict[str, Any]:
    """Mean PM score after each critique/revision round (0 = the initial answer), and per principle:
    how often it was drawn and the mean score change its revisions made."""
    rounds = max((len(t["rounds"]) for t in traces), default=0)
    prompts, responses, where = [], [], []
    for t_index, t in enumerate(traces):
        texts = [t["initial_response"]] + [r["revision"] for r in t["rounds"]]
        for r, text in enumerate(texts):
            prompts.append(t["prompt"])
            responses.append(text)
            where.append((t_index, r))
    scores = scorer.score(prompts, responses) if prompts else []
    per_trace: dict[int, dict[int, float]] = defaultdict(dict)
    for (t_index, r), s in zip(where, scores):
        per_trace[t_index][r] = s
    curve = []
    for r in range(rounds + 1):
        values = [v[r] for v in per_trace.values() if r in v]
        if values:
            curve.append({"round": r, "mean_pm_score": round(sum(values) / len(values), 4), "n": len(values)})
    principles: dict[str, dict[str, Any]] = defaultdict(lambda: {"sampled": 0, "deltas": []})
    for t_index, t in enumerate(traces):
        for r, rnd in enumerate(t["rounds"], start=1):
            entry = principles[rnd["principle_id"]]
            entry["sampled"] += 1
            entry["deltas"].append(per_trace[t_index][r] - per_trace[t_index][r - 1])
    table = [{"principle_id": pid, "sampled": e["sampled"],
              "mean_pm_change": round(sum(e["deltas"]) / len(e["deltas"]), 4) if e["deltas"] else None}
             for pid, e in sorted(principles.items(), key=lambda kv: -kv[1]["sampled"])]
    return {"curve": curve, "principles": table}


def results_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables (the JSON's human-readable twin)."""
    lines = ["# Evaluation results", ""]
    models = results["models"]
    header = "| model | harmlessness Elo | helpfulness Elo | PM score (red-team) | PM score (helpful) | evasive | words |"
    lines += [header, "|---|---|---|---|---|---|---|"]
    elo = {axis: {r["model"]: r for r in rows} for axis, rows in results["elo"].items()}

    def fmt_elo(axis: str, model: str) -> str:
        row = elo.get(axis, {}).get(model)
        return f"{row['elo']:.0f} [{row['ci_low']:.0f}, {row['ci_high']:.0f}]" if row else "-"

    for model in models:
        s = results["answers"].get(model, {})
        lines.append(f"| {model} | {fmt_elo('harmlessness', model)} | {fmt_elo('helpfulness', model)} | "
                     f"{s.get('red_team_pm_score', '-')} | {s.get('helpfulness_pm_score', '-')} | "
                     f"{s.get('evasive_rate', '-')} | {s.get('red_team_mean_words', '-')} |")
    if results.get("revision_curve", {}).get("curve"):
        lines += ["", "## Revision curve (mean PM score after each round)", "", "| round | PM score | n |", "|---|---|---|"]
        lines += [f"| {c['round']} | {c['mean_pm_score']} | {c['n']} |" for c in results["revision_curve"]["curve"]]
    for mc in results.get("mc_eval", []):
        lines += ["", f"- multiple choice `{mc['file']}`: accuracy {mc['accuracy']:.3f} "
                      f"[{mc['ci_low']:.3f}, {mc['ci_high']:.3f}] over {mc['n']} rows"]
    return "\n".join(lines) + "\n"
