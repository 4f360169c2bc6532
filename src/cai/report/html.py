"""``cai report RUN``: one self-contained HTML page about a run, plots embedded as PNG.

Sections: the headline harmlessness-vs-helpfulness Elo picture, the results table, the revision
curve, PPO / RLOO / GRPO training curves (reward, KL), preference-model calibration, per-principle
statistics, sample transcripts, stage timings and counts, and the resolved config. Anything a run hasn't
produced yet is skipped with a note, so the report works on a partial run too.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from cai.errors import CaiError
from cai.eval.harmless import harmless_note, harmless_table
from cai.eval.refusal import over_refusal_table
from cai.eval.verdict import describe_pm, fmt_ci, verdict
from cai.io import read_jsonl, write_text_atomic
from cai.runs import STAGE, STAGES, read_manifest, stage_status

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;padding:0 1rem}
h1{margin-bottom:.2rem}h2{margin-top:2.2rem;border-bottom:1px solid #dde2ea;padding-bottom:.3rem}
.sub{color:#5b6475}table{border-collapse:collapse;width:100%;margin:.8rem 0;font-size:.92rem}
th,td{border:1px solid #dde2ea;padding:.35rem .5rem;text-align:left;vertical-align:top}th{background:#f3f5f9}
td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;border:1px solid #eef1f5}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1rem}pre{background:#f6f8fb;padding:1rem;overflow:auto;font-size:.8rem}
.note{color:#7a8394;font-style:italic}.cell{max-height:11rem;overflow:auto;white-space:pre-wrap}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _plt():
    try:
        import matplotlib
    except ImportError as err:
        raise CaiError("the report needs matplotlib; install it with: pip install 'cai[report]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return '<p class="note">nothing yet</p>'
    columns = columns or list(rows[0])
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            if isinstance(v, float):
                cells.append(f'<td class="num">{v:.4g}</td>')
            else:
                cells.append(f'<td><div class="cell">{_e(v)}</div></td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def elo_plot(results: dict[str, Any]) -> str | None:
    """Harmlessness Elo (y) vs helpfulness Elo (x), one point per model, with 95% intervals."""
    elo = results.get("elo", {})
    if "harmlessness" not in elo or "helpfulness" not in elo:
        return None
    plt = _plt()
    harm = {r["model"]: r for r in elo["harmlessness"]}
    helpful = {r["model"]: r for r in elo["helpfulness"]}
    models = [m for m in results["models"] if m in harm and m in helpful]
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    xs = [helpful[m]["elo"] for m in models]
    ys = [harm[m]["elo"] for m in models]
    ax.plot(xs, ys, color="#b8c2d3", zorder=1)
    for m, x, y in zip(models, xs, ys):
        h, v = helpful[m], harm[m]
        ax.errorbar(x, y, xerr=[[x - h["ci_low"]], [h["ci_high"] - x]], yerr=[[y - v["ci_low"]], [v["ci_high"] - y]],
                    fmt="o", capsize=3, zorder=2)
        ax.annotate(m, (x, y), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("helpfulness Elo")
    ax.set_ylabel("harmlessness Elo")
    ax.set_title("Harmlessness vs helpfulness (AI judge, 95% bootstrap intervals)")
    ax.grid(alpha=0.3)
    return _png(fig)


def line_plot(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _png(fig)


ONLINE_RL_STAGES = ("ppo", "rloo", "grpo")
"""RL stages whose ``train_log.jsonl`` has per-step ``reward_mean`` and ``kl`` (nats per answer) and ``eval_reward`` rows."""


def online_rl_curves(log_path: Path, name: str) -> list[str]:
    """Reward (rollouts and held-out) and KL curves of one online RL stage; none when it has no log yet."""
    log = read_jsonl(log_path) if log_path.is_file() else []
    steps = [r for r in log if "reward_mean" in r]
    if not steps:
        return []
    evals = [r for r in log if "eval_reward" in r]
    plots = [line_plot({"rollout reward (PM)": ([r["step"] for r in steps], [r["reward_mean"] for r in steps]),
                        "held-out reward (PM)": ([r["step"] for r in evals], [r["eval_reward"] for r in evals])},
                       f"{name} reward", f"{name} step", "PM score")]
    # cai's PPO logs "kl_k3", an estimate that is never negative; the penalty's own "kl" (k1 by default,
    # as TRL's RLOO logs it too) can be negative for a single batch, so it is labelled as what it is.
    key = "kl_k3" if any(r.get("kl_k3") is not None for r in steps) else "kl"
    kl = [r for r in steps if r.get(key) is not None]  # none when the KL coefficient is 0
    if kl:
        ylabel = ("KL per answer (nats), k3 estimate, never < 0" if key == "kl_k3"
                  else "KL per answer (nats) as logged; k1 can be < 0")
        plots.append(line_plot({"KL(policy || SL-CAI)": ([r["step"] for r in kl], [r[key] for r in kl])},
                               f"{name} KL to the SL-CAI model", f"{name} step", ylabel))
    return plots


def calibration_plot(table: list[dict[str, Any]]) -> str | None:
    rows = [r for r in table if r.get("count")]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999")
    ax.plot([r["mean_predicted"] for r in rows], [r["mean_target"] for r in rows], marker="o")
    ax.set_xlabel("predicted P(A better)")
    ax.set_ylabel("AI label P(A better)")
    ax.set_title("Preference model calibration (held out)")
    ax.grid(alpha=0.3)
    return _png(fig)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render ``run_dir/report.html`` (or ``out``) from whatever the run has produced so far."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CaiError(f"run folder {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file() and not any((run_dir / s.folder / "manifest.json").is_file() for s in STAGES):
        raise CaiError(f"{run_dir} is not a cai run folder (no config.yaml and no stage manifests)")
    results_path = run_dir / STAGE["eval"].folder / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    parts = [f"<h1>Constitutional AI run: {_e(run_dir.name)}</h1>",
             '<p class="sub">Models trained from a written constitution; judged by an AI feedback model.</p>']
    parts += _evidence_section(results)
    parts += _ai_judged_section(results)
    parts += _over_refusal_section(results)
    parts += _training_section(run_dir, results)
    parts += _details_section(run_dir, results)
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cai report: {_e(run_dir.name)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    target = Path(out) if out else run_dir / "report.html"
    write_text_atomic(target, page)
    return target


def _evidence_section(results: dict[str, Any]) -> list[str]:
    """The verdict, then what it rests on: the gold pairs (no judge) and the judge's check against them."""
    parts = ["<h2>Verdict</h2>"]
    sentences = verdict(results, judge_name=results.get("judge", "the judge")) if results else []
    parts.append("<ul class='verdict'>" + "".join(f"<li>{_e(v)}</li>" for v in sentences) + "</ul>" if sentences
                 else '<p class="note">no evaluation yet: run <code>cai eval</code></p>')
    gold = results.get("gold") or {}
    if gold.get("summary"):
        parts.append("<h2>Gold pairs (no judge)</h2><p class='sub'>Share of human-labelled pairs on which each model's own "
                     "likelihood (per token) prefers the better answer, and the mean margin in nats per token; 95% "
                     "bootstrap intervals.</p>")
        parts.append(_table([{"model": m, "group": r["group"], "pairs": r["pairs"],
                              "accuracy": fmt_ci(r["accuracy"], r["accuracy_ci"], percent=True),
                              "margin": fmt_ci(r["margin"], r["margin_ci"], sign=True)}
                             for m, rows in gold["summary"].items() for r in rows]))
    methods = results.get("judge_methods") or {}
    check = results.get("judge_check") or {}
    if methods:
        used = results.get("judge_method")
        parts.append("<h2>Judge check</h2><p class='sub'>The judge labels the test gold pairs by the same procedure "
                     "as the AI feedback labels (both orders), by each judging method: agreement with the human label "
                     "by kind (Wilson 95% interval), position bias (mean P(first slot) - 0.5) and mean confidence. "
                     f"The AI-judged numbers below use <b>{_e(used)}</b>, chosen by {_e(results.get('judge_method_chosen_by', '?'))}.</p>")
        parts.append(_table([_method_row(m, row, m == used) for m, row in methods.items()]))
    elif check.get("all"):
        parts.append("<h2>Judge check</h2><p class='sub'>The judge labels the gold pairs by the same procedure as "
                     "the AI feedback labels (both orders, (A)/(B) log-probabilities): agreement with the human label, "
                     "Wilson 95% interval.</p>")
        parts.append(_table([{"group": g, "pairs": v["pairs"], "agreement": fmt_ci(v["agreement"], v["ci"], percent=True)}
                             for g, v in check.items() if isinstance(v, dict)]))
    return parts


def _method_row(method: str, row: dict[str, Any], used: bool) -> dict[str, Any]:
    """One judging method's line of the judge check: agreement by kind, position bias, confidence."""
    if "unsupported" in row:
        return {"method": method, "all": f"cannot run: {row['unsupported']}"}
    kinds = ("all", "harmful", "evasive", "unhelpful", "helpfulness")
    cells = {k: f"{fmt_ci(row[k]['agreement'], row[k]['ci'], percent=True)} (n={row[k]['pairs']})" if k in row else "-"
             for k in kinds}
    bias, confidence = row.get("position_bias"), row.get("mean_confidence")
    return {"method": method + (" (used)" if used else ""), **cells,
            "position bias": "-" if bias is None else f"{bias:+.2f}",
            "mean confidence": "-" if confidence is None else f"{confidence:.2f}",
            "clears chance": "yes" if row.get("trusted") else "no"}


def _ai_judged_section(results: dict[str, Any]) -> list[str]:
    """The Elo plot and, per model, its Elo, PM scores, evasive refusals and answer length."""
    parts = ["<h2>Harmlessness vs helpfulness (AI-judged)</h2>"]
    plot = elo_plot(results) if results else None
    parts.append(plot or '<p class="note">no evaluation yet: run <code>cai eval</code></p>')
    if results:
        rows = []
        elo = {axis: {r["model"]: r for r in table} for axis, table in results.get("elo", {}).items()}
        for m in results["models"]:
            s = results.get("answers", {}).get(m, {})
            rows.append({"model": m, "harmlessness Elo": elo.get("harmlessness", {}).get(m, {}).get("elo", ""),
                         "helpfulness Elo": elo.get("helpfulness", {}).get(m, {}).get("elo", ""),
                         "PM score, red-team (reward model used in training)": s.get("red_team_pm_score", ""),
                         "PM score, helpfulness (reward model used in training)": s.get("helpfulness_pm_score", ""),
                         "evasive refusals": s.get("evasive_rate", ""), "mean words": s.get("red_team_mean_words", "")})
        parts.append(_table(rows))
    note = harmless_note(results)
    if note:
        parts.append(f"<h3>Harmless rate</h3><p class='sub'>{_e(note)}</p>")
        if table := harmless_table(results):
            parts.append(_table(table))
    if results.get("mc_eval"):
        parts.append("<h3>Multiple choice (eval.mc_files)</h3><p class='sub'>The judge's accuracy on each "
                     "HHH-format multiple-choice file (eval.mc_files), 95% interval.</p>")
        parts.append(_table([{"file": mc["file"], "rows": mc["n"],
                              "accuracy": f"{mc['accuracy']:.1%} [{mc['ci_low']:.1%}, {mc['ci_high']:.1%}]"}
                             for mc in results["mc_eval"]]))
    return parts


def _over_refusal_section(results: dict[str, Any]) -> list[str]:
    """Refusals on safe XSTest-format prompts beside compliance on unsafe ones, per model (when measured)."""
    rows = over_refusal_table(results)
    if not rows:
        return []
    note = results["over_refusal"]["judge_note"]
    return ["<h2>Over-refusal (XSTest-format)</h2><p class='sub'>Each model answers safe prompts that look unsafe and "
            "unsafe contrast prompts; a string classifier (XSTest's refusal phrases, plus partial refusals) reads each "
            f"answer. Lower is better in both columns; Wilson 95% intervals. Judge: {_e(note)}.</p>", _table(rows)]


def _training_section(run_dir: Path, results: dict[str, Any]) -> list[str]:
    """Revision curves, RL and SFT curves, PM calibration; then a line each on the critique stage and the PM."""
    parts = ["<h2>Training</h2><div class='grid'>"]
    curve = results.get("revision_curve", {}).get("curve", [])
    if curve:
        parts.append(line_plot({"mean PM score": ([c["round"] for c in curve], [c["mean_pm_score"] for c in curve])},
                               "Revision curve", "critique/revision round", "preference-model score"))
    judged = results.get("judged_revision_curve") or []
    if judged:
        agreement = (results.get("judge_check") or {}).get("all")
        note = f" (judge agrees with gold {agreement['agreement']:.0%})" if agreement else ""
        parts.append(line_plot({"P(revision better than initial)": ([c["round"] for c in judged],
                                                                     [c["p_revision_better"] for c in judged])},
                               f"Revision curve, judged{note}", "critique/revision round", "judge's probability"))
    for stage in ONLINE_RL_STAGES:  # the RL stages that sample and score: same log keys, same curves
        parts += online_rl_curves(run_dir / STAGE[stage].folder / "train_log.jsonl", stage.upper())
    sft_log = run_dir / STAGE["sft"].folder / "train_log.jsonl"
    if sft_log.is_file():
        rows = read_jsonl(sft_log)
        parts.append(line_plot({"loss": ([r["step"] for r in rows], [r["loss"] for r in rows])}, "SL-CAI fine-tuning",
                               "step", "loss (answer tokens)"))
    metrics_path = run_dir / STAGE["pm"].folder / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        plot = calibration_plot(metrics.get("calibration", []))
        if plot:
            parts.append(plot)
    parts.append("</div>")
    critique = (read_manifest(run_dir / STAGE["critique"].folder) or {}).get("counts", {})
    if critique.get("rows"):
        acceptance = critique.get("revision_acceptance")
        parts.append(f"<p>Critique stage: mode <code>{_e(critique.get('mode', 'critique_revision'))}</code>, "
                     f"{_e(critique.get('candidates', 1))} candidate(s) per round; {_e(critique.get('revised_rows', '?'))} "
                     f"of {_e(critique['rows'])} rows end with an accepted revision"
                     f"{f' ({acceptance:.0%})' if isinstance(acceptance, (int, float)) else ''}; rejected revisions by "
                     f"reason: {_e(critique.get('flags') or 'none')}.</p>")
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        parts.append(f"<p>Preference model: {_e(describe_pm(m))}, "
                     f"{_e(m.get('train_pairs'))} training pairs.</p>")
    pm_gold = (results or {}).get("pm_gold") or {}
    if pm_gold.get("all"):
        total = pm_gold["all"]
        by_kind = "; ".join(f"{k} {fmt_ci(v['agreement'], v['ci'], percent=True)} (n={v['pairs']})"
                            for k, v in pm_gold.items() if k != "all")
        parts.append(f"<p>The preference model against the human gold pairs (it scores the better answer higher): "
                     f"{_e(fmt_ci(total['agreement'], total['ci'], percent=True))} of {_e(total['pairs'])} test pairs"
                     f"{'' if total['ci'][0] > 0.5 else ', which includes chance'}; {_e(by_kind)}.</p>")
    return parts


def _details_section(run_dir: Path, results: dict[str, Any]) -> list[str]:
    """Principles drawn, sample transcripts, each stage's status and the run's config."""
    parts = ["<h2>Principles</h2>"]
    parts.append(_table(results.get("revision_curve", {}).get("principles", []) or _principle_counts(run_dir)))
    parts.append("<h2>Sample transcripts</h2>")
    parts.append(_table(results.get("transcripts", []),
                        ["prompt", "initial", "principle", "critique", "revision", "final_model", "final_answer"])
                 if results.get("transcripts") else '<p class="note">none yet</p>')
    parts.append("<h2>Stages</h2>")
    stage_rows = [{"stage": r["stage"], "status": r["status"], "seconds": r["elapsed_s"], "peak GB": r["peak_rss_gb"],
                   "model": (read_manifest(run_dir / STAGE[r["stage"]].folder) or {}).get("model", ""),
                   "counts": r["counts_text"]} for r in stage_status(run_dir) if r["status"] != "not started"]
    parts.append(_table(stage_rows))
    if (run_dir / "config.yaml").is_file():
        parts.append(f"<h2>Config</h2><pre>{_e((run_dir / 'config.yaml').read_text())}</pre>")
    return parts


def _principle_counts(run_dir: Path) -> list[dict[str, Any]]:
    """How often each principle was drawn in the critique stage (when no PM scores exist)."""
    from collections import Counter

    path = run_dir / STAGE["critique"].folder / "data.jsonl"
    counts = Counter(r["principle_id"] for row in read_jsonl(path) for r in row["rounds"]) if path.is_file() else Counter()
    return [{"principle_id": k, "sampled": v} for k, v in counts.most_common()]
