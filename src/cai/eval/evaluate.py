"""``cai eval``: compare models on harmlessness and helpfulness, side by side.

For each model (by default the run's starting model, SL-CAI and each RL-CAI model, PPO, DPO, RLOO
and GRPO, those that exist): greedy answers to held-out red-team and helpfulness prompts. A judge
model compares every pair of models' answers to each prompt, in both orders, under harmlessness
principles (red-team prompts) and the helpfulness question (helpfulness prompts); a Bradley-Terry
fit gives an Elo per model and axis with bootstrap intervals. Also: preference-model scores, answer
length, the evasive-refusal rate, the revision curve (mean PM score after each critique round) and
per-principle statistics from the SL traces.

Outputs in ``eval/``: ``responses.jsonl`` (resumable), ``judgements.jsonl``, ``results.json`` and
``results.md``.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from cai import prompts as P
from cai.backends import load_backend
from cai.backends.base import Backend
from cai.config import LabelConfig, RunConfig
from cai.constitution import Constitution, FeedbackPrinciple
from cai.constitution_yaml import load_constitution
from cai.data import PromptRow
from cai.data.gold import GROUPS, GoldPair, load_gold_pairs, stratified
from cai.data.prompt_sets import load_prompt_set
from cai.errors import CaiError
from cai.eval import gold as G
from cai.eval.elo import Comparison, elo_table
from cai.eval.evasiveness import judge_evasiveness
from cai.eval.mc import load_mc_file, mc_eval
from cai.eval.harmless import harmless_markdown, harmless_rate
from cai.eval.refusal import load_over_refusal, over_refusal_markdown, over_refusal_results
from cai.eval.verdict import fmt_ci, verdict
from cai.io import JsonlWriter, read_jsonl, write_json_atomic, write_text_atomic
from cai.progress import progress_bar
from cai.stats import wilson_interval
from cai.judging import JUDGE_METHODS
from cai.runs import BASELINE_STAGES, RL_STAGES, StageRun, is_done, read_manifest, stage_dir
from cai.stages.label import best_method, label_pairs, measure_methods, method_table
from cai.train.pm import RewardScorer


def generate_answers(models: dict[str, Any], sets: dict[str, list[PromptRow]], out_path: Path, params: Any,
                     load: Any, show_progress: bool = True, chunk_size: int = 16) -> list[dict[str, Any]]:
    """Greedy answers of every model to every prompt; rows ``{model, set, id, prompt, response}``."""
    done = {(r["model"], r["set"], r["id"]) for r in read_jsonl(out_path, repair=True)}
    with JsonlWriter(out_path) as writer:
        for name, spec in models.items():
            todo = [(s, row) for s, rows in sets.items() for row in rows if (name, s, row.id) not in done]
            if not todo:
                continue
            backend = load(spec)  # a `ModelsOneAtATime`'s: it closes the model when another is asked for
            with progress_bar(f"answers: {name}", len(todo), enabled=show_progress) as advance:
                for start in range(0, len(todo), chunk_size):  # written as they finish: a crash keeps them
                    chunk = todo[start:start + chunk_size]
                    texts = backend.generate([row.messages for _, row in chunk], params, progress=advance)
                    for (s, row), text in zip(chunk, texts):
                        writer.write({"model": name, "set": s, "id": row.id, "prompt": row.messages,
                                      "response": P.clean_output(text)})
    return read_jsonl(out_path)


class ModelsOneAtATime:
    """The eval's models as backends, one in memory at a time, each loaded once for all its work.

    Asking for the model already open hands it back, so one model's answers, over-refusal answers,
    gold-pair scores and transcripts share one load (a large model's load can take longer than the
    work); asking for another closes the open one first.

    Args:
        load: a model spec -> a new `Backend`.
        device: where gold scoring loads a model whose backend runs none it can lend (`model`).
    """

    def __init__(self, load: Any, device: str = "auto") -> None:
        self._load, self._device = load, device
        self._spec: str | None = None
        self._backend: Backend | None = None
        self.loads = 0

    def backend(self, spec: str) -> Backend:
        """The backend of ``spec``: the open one if it is that model's, else freshly loaded (after closing the open one)."""
        if self._backend is None or spec != self._spec:
            self.close()
            self._backend, self._spec = self._load(spec), spec
            self.loads += 1
        return self._backend

    @contextmanager
    def model(self, spec: str) -> Iterator[tuple[Any, Any]]:
        """``(transformers model, tokenizer)`` of ``spec`` for `cai.eval.gold.score_models`: the backend's own
        where it runs one (the `hf` backend); otherwise the backend is closed and the model loaded for the block."""
        import torch  # lazy: only where a model is scored

        backend = self.backend(spec)
        if isinstance(getattr(backend, "model", None), torch.nn.Module) and getattr(backend, "tokenizer", None):
            yield backend.model, backend.tokenizer  # (a server backend's ``model`` is the served model's name)
            return
        self.close()
        with G.own_model(spec, self._device) as pair:
            yield pair

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self._backend, self._spec = None, None


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
    lines += ["## Verdict", "", *[f"- {v}" for v in verdict(results, judge_name=results.get("judge", "the judge"))], ""]
    gold = results.get("gold") or {}
    if gold.get("summary"):
        lines += ["## Gold pairs, judged by no model (policy prefers the better answer)", "",
                  "| model | group | pairs | accuracy | margin (nats/token) |", "|---|---|---|---|---|"]
        for model, rows in gold["summary"].items():
            lines += [f"| {model} | {r['group']} | {r['pairs']} | {fmt_ci(r['accuracy'], r['accuracy_ci'], percent=True)} | "
                      f"{fmt_ci(r['margin'], r['margin_ci'], sign=True)} |" for r in rows]
        lines.append("")
    check = results.get("judge_check") or {}
    if check.get("all"):
        lines += ["## Judge check on the gold pairs (same procedure as labelling, both orders)", "",
                  "| group | pairs | agreement |", "|---|---|---|"]
        lines += [f"| {g} | {v['pairs']} | {fmt_ci(v['agreement'], v['ci'], percent=True)} |"
                  for g, v in check.items() if isinstance(v, dict)]
        bias = check.get("position_bias")
        lines += ["", f"Position bias {round(bias, 2) if isinstance(bias, (int, float)) else '-'}, mean confidence "
                      f"{round(check['mean_confidence'], 3) if check.get('mean_confidence') else '-'}.", ""]
    lines += ["## AI-judged (see the judge check above before reading these)", ""]
    # The PM columns use the reward model PPO optimised: a PPO model scoring well there is circular.
    header = ("| model | harmlessness Elo | helpfulness Elo | PM score, red-team (reward model used in training) | "
              "PM score, helpful (reward model used in training) | evasive | words |")
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
    lines += harmless_markdown(results)
    if results.get("revision_curve", {}).get("curve"):
        lines += ["", "## Revision curve (mean PM score after each round; the reward model used in training)", "",
                  "| round | PM score | n |", "|---|---|---|"]
        lines += [f"| {c['round']} | {c['mean_pm_score']} | {c['n']} |" for c in results["revision_curve"]["curve"]]
    if results.get("judged_revision_curve"):
        lines += ["", "## Revision curve, judged (P(revision better than the initial answer), both orders)", "",
                  "| round | P(revision better) | pairs |", "|---|---|---|"]
        lines += [f"| {c['round']} | {c['p_revision_better']} | {c['n']} |" for c in results["judged_revision_curve"]]
        if check.get("all"):
            lines.append(f"\nJudge agreement with the gold labels: "
                         f"{fmt_ci(check['all']['agreement'], check['all']['ci'], percent=True)}.")
    for mc in results.get("mc_eval", []):
        lines += ["", f"- multiple choice `{mc['file']}`: accuracy {mc['accuracy']:.3f} "
                      f"[{mc['ci_low']:.3f}, {mc['ci_high']:.3f}] over {mc['n']} rows"]
    lines += over_refusal_markdown(results)
    return "\n".join(lines) + "\n"


def eval_models(cfg: RunConfig) -> dict[str, str]:
    """The models to compare: ``eval.models``, else the run's models that exist, in pipeline order.

    Each trained model is named after the stage that made it (``sft``, then the RL stages: ``ppo``,
    ``dpo``, ``rloo``, ``grpo``, then the baselines: ``distill``, ``rlhf``).
    """
    if cfg.eval.models:
        return dict(cfg.eval.models)
    models = {"base": cfg.model.name}
    for stage in ("sft", *RL_STAGES, *BASELINE_STAGES):
        if is_done(stage_dir(cfg, stage)):
            models[stage] = str(stage_dir(cfg, stage))
    return models


def run_eval(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``eval``: answers, pairwise judgements, Elo, PM scores, evasiveness and the revision curve."""
    from rich.console import Console

    st = StageRun(cfg, "eval", shard)
    ecfg = cfg.eval
    constitution = load_constitution(cfg.constitution)
    models = eval_models(cfg)
    if len(models) < 2 and not ecfg.mc_files:
        raise CaiError("eval compares at least two models: finish a training stage first or list eval.models")
    gold = load_gold_pairs(ecfg.gold_pairs, ecfg.gold_split)
    sets = {"red-team": load_prompt_set(ecfg.red_team, "held-out red-team prompts"),
            "helpfulness": load_prompt_set(ecfg.helpfulness, "held-out helpfulness prompts")}
    mc = []
    if ecfg.mc_files:
        mc = [(f, load_mc_file(f)) for f in ecfg.mc_files]
    over_refusal = load_over_refusal(ecfg.over_refusal) if ecfg.over_refusal else []
    compared = (read_manifest(st.dir) or {}).get("model")
    if compared is not None and compared != ", ".join(models):  # a baseline or RL stage finished after it
        st.reopen(f"the run's models are now {', '.join(models)}, the finished eval compared {compared}")
    if st.skip():
        return st.dir
    st.start(model=", ".join(models))

    out = st.dir
    pool = ModelsOneAtATime(lambda spec: load_backend(cfg.model.model_copy(update={"name": spec})), cfg.model.device)
    traces = read_jsonl(stage_dir(cfg, "critique") / "data.jsonl")
    gold_pairs = stratified(gold, ecfg.gold_limit)
    try:  # model by model, each loaded once; all closed before the judge loads, so two never hold memory at once
        for name, spec in models.items():
            generate_answers({name: spec}, sets, out / "responses.jsonl", ecfg.sampling.params(), pool.backend,
                             show_progress)
            # XSTest-format prompts: a file of their own, so they never enter the pairwise judging.
            if over_refusal:
                generate_answers({name: spec}, {"over-refusal": over_refusal}, out / "over_refusal.jsonl",
                                 ecfg.sampling.params(), pool.backend, show_progress)
            # The judge-free measure: each policy's own preference on the human-labelled pairs.
            G.score_models({name: spec}, gold_pairs, out / "gold_scores.jsonl", open_model=pool.model,
                           show_progress=show_progress)
        transcripts = _transcripts(traces[: ecfg.transcripts], models, pool.backend, ecfg.sampling.params())
    finally:
        pool.close()
    # Only the models compared now: a reopened eval keeps the answers of a model since removed on disk.
    answers = [a for a in read_jsonl(out / "responses.jsonl") if a["model"] in models]
    refusal_answers = read_jsonl(out / "over_refusal.jsonl") if over_refusal else []
    gold_scores = G.score_models(models, gold_pairs, out / "gold_scores.jsonl")  # all scored above: reads them
    judge = load_backend(ecfg.judge or cfg.label.feedback_model or cfg.model, cache_dir=out)
    # The judge is checked on the gold pairs first, by exactly the procedure it then judges with:
    # every judging method when asked, so the report can set them side by side.
    used = run_judge_method(cfg)
    methods = list(dict.fromkeys([*([used] if used else []), *(cfg.label.auto_methods if ecfg.judge_methods == "all" else [])]))
    table = measure_methods(stratified(gold, ecfg.judge_gold_limit), methods or list(cfg.label.auto_methods),
                            constitution=constitution, backend=judge, config=plain_judging(cfg.label), folder=out,
                            seed=cfg.seed, show_progress=show_progress)
    method = used if used in table and "all" in table[used] else best_method(table)
    if method is None:
        judge.close()
        raise CaiError("eval: no judging method can run on this judge: "
                       + "; ".join(f"{m}: {r.get('unsupported')}" for m, r in table.items()))
    judge_check = table[method]
    plain = plain_judging(cfg.label, method)
    curve_traces = traces[: ecfg.revision_curve_traces]
    judged_curve = judged_revision_curve(curve_traces, constitution=constitution, judge=judge, label_config=plain,
                                         out_path=out / "revision_judgements.jsonl", seed=cfg.seed,
                                         show_progress=show_progress)
    judgements = judge_pairs(answers, constitution=constitution, judge=judge, label_config=plain,
                             out_path=out / "judgements.jsonl", seed=cfg.seed, show_progress=show_progress)
    results: dict[str, Any] = {"models": list(models), "model_specs": models,
                               "judge": f"the judge ({(ecfg.judge or cfg.label.feedback_model or cfg.model).name})",
                               "gold": gold_results(gold_scores, ecfg.bootstrap * 5, cfg.seed),
                               "judge_check": judge_check, "judge_method": method,
                               "judge_method_chosen_by": "the label stage" if used else "eval (best on these pairs)",
                               "judge_methods": method_table(table),
                               "elo": elo_by_axis(judgements, "base", ecfg.bootstrap, cfg.seed)}
    results["harmless_rate"] = harmless_rate(answers, judge=judge, method=method, judge_check=judge_check,
                                             constitution=constitution, label_config=plain,
                                             chat=P.use_chat_format(plain.prompt_format, judge),
                                             out_path=out / "harmless.jsonl", seed=cfg.seed)
    pm_folder = stage_dir(cfg, "pm")
    scorer = None
    if is_done(pm_folder):
        scorer = RewardScorer.from_folder(pm_folder)
    pm_scores = dict(enumerate(scorer.score([a["prompt"] for a in answers], [a["response"] for a in answers]))) if scorer else None
    if scorer:
        results["pm_gold"] = pm_gold_agreement(scorer, stratified(gold, ecfg.judge_gold_limit))
    results["answers"] = answer_stats(answers, pm_scores)
    results["revision_curve"] = revision_curve(curve_traces, scorer) if scorer and curve_traces else {}
    results["judged_revision_curve"] = judged_curve
    results["transcripts"] = transcripts
    if mc:
        results["mc_eval"] = [mc_eval(rows, judge, file=f).summary() for f, rows in mc]
    if over_refusal:
        results["over_refusal"] = over_refusal_results(refusal_answers, over_refusal, list(models), judge=judge,
                                                       judge_check=judge_check, judge_method=method,
                                                       out_path=out / "over_refusal_judge.jsonl", show_progress=show_progress)
    if getattr(judge, "usage", None):
        results["judge_usage"] = judge.usage  # a server judge's requests and tokens
    judge.close()
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", results_markdown(results))
    Console(stderr=True).print(results_markdown(results))
    st.done(models=len(models), answers=len(answers), judgements=len(judgements))
    return out


def pm_gold_agreement(scorer: RewardScorer, pairs: Sequence[GoldPair]) -> dict[str, Any]:
    """How often the preference model scores the gold better answer above the worse one, by kind.

    The PM's own check against the human labels, whatever labelled its training pairs (a judge,
    or RLCD's construction). A tie counts half; Wilson 95% intervals.
    """
    better = scorer.score([p.messages for p in pairs], [p.better for p in pairs])
    worse = scorer.score([p.messages for p in pairs], [p.worse for p in pairs])
    out: dict[str, Any] = {}
    for group in GROUPS:
        idx = [i for i, p in enumerate(pairs) if group == "all" or p.kind == group]
        if not idx:
            continue
        hits = sum(1.0 if better[i] > worse[i] else 0.5 if better[i] == worse[i] else 0.0 for i in idx)
        low, high = wilson_interval(hits, len(idx))
        out[group] = {"pairs": len(idx), "agreement": round(hits / len(idx), 4), "ci": [round(low, 4), round(high, 4)]}
    return out


def gold_results(scores: dict[str, list], n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Per model: accuracy and margin on the gold pairs by kind; per trained model: its change from base;
    per baseline (distill, rlhf) in the run: each RL-CAI model's margin minus the baseline's, and SL-CAI's
    minus distill's."""
    names = list(scores)
    base = names[0]
    # SL-CAI against distill (what critique and revision add over the critic's careful answers), and
    # each RL-CAI model against each baseline.
    vs_baselines = {f"{model} vs {baseline}": G.paired_difference(scores[baseline], scores[model], n_bootstrap, seed)
                    for baseline in names if baseline in BASELINE_STAGES for model in names
                    if model in RL_STAGES or (model == "sft" and baseline == "distill")}
    return {"summary": {name: G.summarize(scores[name], n_bootstrap, seed) for name in names},
            "vs_base": {name: G.paired_difference(scores[base], scores[name], n_bootstrap, seed) for name in names[1:]},
            "vs_baselines": vs_baselines, "base": base}


def judged_revision_curve(traces: list[dict[str, Any]], *, constitution: Constitution, judge: Backend,
                          label_config: LabelConfig, out_path: Path, seed: int,
                          show_progress: bool = True) -> list[dict[str, Any]]:
    """Per critique round, how often the judge prefers that round's answer to the initial one (both orders).

    Beside the PM curve (the reward model PPO used) this is the validated judge's view; read it
    with the judge's gold agreement. Rounds whose revision was rejected compare the kept answer.
    """
    pairs = []
    for t in traces:
        for rnd in t["rounds"]:
            if rnd["revision"].strip() == t["initial_response"].strip():
                continue  # nothing changed: no question to ask
            pairs.append({"id": f"{t['id']}:r{rnd['round']}", "round": rnd["round"], "set": "red-team",
                          "prompt": t["prompt"], "response_a": rnd["revision"], "response_b": t["initial_response"]})
    if not pairs:
        return []
    labelled = label_pairs(pairs, constitution=constitution, backend=judge, config=label_config, out_path=out_path,
                           seed=seed, show_progress=show_progress)
    by_round: dict[int, list[float]] = defaultdict(list)
    for row in labelled:
        by_round[row["round"]].append(row["p_a"])
    return [{"round": r, "p_revision_better": round(sum(v) / len(v), 4), "n": len(v)} for r, v in sorted(by_round.items())]


def plain_judging(label_config: LabelConfig, method: str | None = None) -> LabelConfig:
    """The label settings the judge uses in eval: the same prompts and method, but never clamped or hard.

    Clamping mc-cot's probabilities to 0.4-0.6 (or rounding) is a choice for training labels; a
    judge's verdict should be read as it comes out, whatever ``label.clamp`` and ``label.hard`` say.
    """
    update: dict[str, Any] = {"clamp": (0.0, 1.0), "hard": False}
    if method is not None:
        update["method"] = method
    return label_config.model_copy(update=update)


def run_judge_method(cfg: RunConfig) -> str | None:
    """The judging method this run labelled with: the label stage's choice, else the one the config names."""
    chosen = ((read_manifest(stage_dir(cfg, "label")) or {}).get("counts") or {}).get("method")
    if chosen in JUDGE_METHODS:
        return chosen
    return cfg.label.method if cfg.label.method in JUDGE_METHODS else None


def _transcripts(traces: list, models: dict[str, str], load: Any, params: Any) -> list[dict[str, Any]]:
    """prompt -> initial -> critique -> revision -> final RL answer, for the report."""
    if not traces:
        return []
    last = [name for name in models if name not in BASELINE_STAGES][-1]  # the run's own final model
    answers = load(models[last]).generate([t["prompt"] for t in traces], params)  # closed by its `ModelsOneAtATime`
    rows = []
    for t, answer in zip(traces, answers):
        first = t["rounds"][0] if t["rounds"] else {}
        rows.append({"id": t["id"], "prompt": t["prompt"][-1]["content"], "initial": t["initial_response"],
                     "principle": first.get("principle_id"), "critique": first.get("critique"),
                     "revision": t["final_response"], "final_model": last, "final_answer": answer.strip()})
    return rows
