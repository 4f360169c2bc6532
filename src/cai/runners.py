"""Stage runners: one function per pipeline stage, from a `RunConfig` to the stage's folder.

Each ``run_<stage>`` checks its inputs and config first (constitution, prompts, the previous
stage's output) and only then loads models, so mistakes fail in a second, not after a model
load. A stage whose manifest says ``done`` is skipped; a ``running`` one resumes from its data.
`cai.pipeline` runs them in order.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console

from cai.config import RunConfig, config_to_yaml
from cai.errors import CaiError
from cai.io import read_jsonl, write_text_atomic
from cai.runs import StageRecord, is_done, shard_dir, stage_config_hash, stage_dir
from cai.sharding import shard_rows

console = Console(stderr=True)


class _TokenSizer:
    """Counts a model's prompt tokens with its tokenizer alone (no weights loaded), for `_fit`."""

    def __init__(self, spec: str) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from cai.models import resolve_model_path

        path, _ = resolve_model_path(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.context_length = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)

    def count_tokens(self, chat: Any) -> int:
        text = chat if isinstance(chat, str) else self.tokenizer.apply_chat_template(
            list(chat), tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _skip_if_done(out: Path, name: str) -> bool:
    if is_done(out):
        console.print(f"{name}: already done in {out} (delete the folder to redo it)")
        return True
    return False


def _require(cfg: RunConfig, stage: str, message: str) -> Path:
    """The folder of an earlier stage this one reads; a clear error when it isn't finished."""
    source = stage_dir(cfg, stage)
    if not is_done(source):
        raise CaiError(message.replace("{source}", str(source)))
    return source


def _record(cfg: RunConfig, out: Path, stage: str, model: str) -> StageRecord:
    return StageRecord(out, stage, config_yaml=config_to_yaml(cfg), config_hash=stage_config_hash(cfg, stage),
                       model=model, seed=cfg.seed)


def _load_rows(prompt_cfg: Any, what: str) -> list:
    from cai.data import load_prompts

    rows, report = load_prompts(prompt_cfg.source, split=prompt_cfg.split, limit=prompt_cfg.limit)
    console.print(f"{what}: {report.summary()}")
    return rows


def _fit(rows: list, backend: Any, budget: int, build: Any, policy: str, what: str) -> list:
    """Drop or left-truncate prompts whose stage prompt + generation budget overflow the context."""
    context = getattr(backend, "context_length", None)
    if not context:
        return rows
    from cai.data import LoadReport, fit_to_context

    report = LoadReport(source=what, read=len(rows), kept=len(rows))
    fitted = fit_to_context(rows, lambda chat: backend.count_tokens(build(chat)) + budget, context, policy=policy,
                            report=report)
    if report.truncated or report.dropped_too_long:
        console.print(f"{what}: {report.truncated} prompts shortened and {report.dropped_too_long} dropped to fit "
                      f"the model's {context}-token context")
    return fitted


def run_critique(cfg: RunConfig, *, show_progress: bool = True, shard: str | None = None) -> Path:
    """Stage 1 of SL-CAI: critique/revision traces (+ helpfulness answers) into critique_revision/."""
    from cai import prompts as P
    from cai.backends import load_backend
    from cai.constitution import load_constitution
    from cai.stages.critique_revision import clean_output, run_critique_revision
    from cai.stages.sampling import sample_responses

    out = shard_dir(cfg, "critique", shard)
    if _skip_if_done(out, "critique"):
        return out
    ccfg = cfg.critique
    constitution = load_constitution(cfg.constitution)
    if ccfg.max_examples is not None:
        import dataclasses

        constitution = dataclasses.replace(
            constitution, critique_revision_examples=constitution.critique_revision_examples[: ccfg.max_examples])
    rows = shard_rows(_load_rows(ccfg.prompts, "red-team prompts"), shard)
    helpful_rows = shard_rows(_load_rows(ccfg.helpfulness, "helpfulness prompts"), shard) if ccfg.helpfulness else []
    record = _record(cfg, out, "critique", cfg.model.name)
    backend = load_backend(cfg.model)
    critic = load_backend(ccfg.critic) if ccfg.critic else backend
    principle = constitution.critique_revision_principles[0]
    budget = ccfg.response.max_new_tokens + ccfg.critique_sampling.max_new_tokens + ccfg.revision_sampling.max_new_tokens
    rows = _fit(rows, critic, budget, lambda chat: P.critique_chat(constitution, chat, "", principle),
                ccfg.prompts.too_long, "red-team prompts")
    written = len(read_jsonl(out / "data.jsonl", repair=True))
    record.update(prompts=len(rows), rows=written)

    def on_chunk(n: int) -> None:
        nonlocal written
        written += n
        record.update(rows=written)

    data = run_critique_revision(rows, constitution=constitution, backend=backend, critic=critic, config=ccfg,
                                 out_path=out / "data.jsonl", seed=cfg.seed, show_progress=show_progress,
                                 on_chunk=on_chunk)
    helpful = []
    if helpful_rows:
        helpful_rows = _fit(helpful_rows, backend, ccfg.response.max_new_tokens, lambda chat: chat,
                            ccfg.helpfulness.too_long, "helpfulness prompts")
        helpful = sample_responses(helpful_rows, backend=backend, params=ccfg.response.params(),
                                   out_path=out / "helpfulness.jsonl", seed=cfg.seed, chunk_size=ccfg.chunk_size,
                                   clean=clean_output, show_progress=show_progress, description="helpfulness answers")
    flags = Counter(flag.split(":")[-1] for row in data for flag in row["flags"])
    record.done(prompts=len(rows), rows=len(data), helpfulness_rows=len(helpful), rounds=ccfg.rounds,
                flags=dict(flags), revisions_kept_previous=sum(r["kept_previous"] for row in data for r in row["rounds"]))
    return out


def run_sft(cfg: RunConfig, *, show_progress: bool = True) -> Path:
    """Stage 2 of SL-CAI: fine-tune the starting model on the revisions, into sl_cai/."""
    import json

    from cai.train.common import write_model_card
    from cai.train.sft import build_sft_examples, train_sft

    out = stage_dir(cfg, "sft")
    if _skip_if_done(out, "sft"):
        return out
    source = _require(cfg, "critique", "sft needs the critique stage's output in {source}; run `cai critique` with this config first")
    critique_rows = read_jsonl(source / "data.jsonl")
    helpful_chats = [r["messages"] for r in read_jsonl(source / "helpfulness.jsonl")]
    if cfg.sft.extra_data:
        helpful_chats += _read_sft_file(cfg.sft.extra_data)
    examples, counts = build_sft_examples(critique_rows, helpful_chats, revisions=cfg.sft.revisions,
                                          helpfulness_ratio=cfg.sft.helpfulness_ratio, seed=cfg.seed)
    if not examples:
        raise CaiError(f"no usable revisions in {source / 'data.jsonl'}; the critique stage produced nothing to train on")
    record = _record(cfg, out, "sft", cfg.model.name)
    write_text_atomic(out / "train_data.jsonl", "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in examples))
    record.update(**counts)
    metrics = train_sft(examples, model_spec=cfg.model.name, out_dir=out, config=cfg.sft, seed=cfg.seed,
                        device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code,
                        show_progress=show_progress)
    write_model_card(
        out, title=f"SL-CAI model of run '{cfg.name}'", base_model=cfg.model.name,
        summary=(f"Supervised Constitutional AI model: `{cfg.model.name}` fine-tuned on its own revisions of "
                 f"red-team answers under the `{cfg.constitution}` constitution, mixed with its answers to "
                 "helpfulness prompts. Made by cai."),
        facts={"constitution": cfg.constitution, "critique rounds": cfg.critique.rounds,
               "revisions used": cfg.sft.revisions, **counts, **{k: v for k, v in metrics.items() if v is not None}},
        config_yaml=config_to_yaml(cfg),
    )
    record.done(**counts, **metrics)
    return out


def policy_spec(cfg: RunConfig) -> str:
    """The policy RL-CAI starts from: ``sample.policy``, else this run's SL-CAI model."""
    if cfg.sample.policy:
        return cfg.sample.policy
    sl = stage_dir(cfg, "sft")
    if not is_done(sl):
        raise CaiError(f"sampling needs a policy: run `cai sft` first (expected a model in {sl}) "
                       "or set sample.policy=MODEL")
    return str(sl)


def run_sample(cfg: RunConfig, *, show_progress: bool = True, shard: str | None = None) -> Path:
    """K responses per red-team (and helpfulness) prompt from the policy, into samples/."""
    from cai.backends import load_backend
    from cai.stages.critique_revision import clean_output
    from cai.stages.sampling import sample_responses

    out = shard_dir(cfg, "sample", shard)
    if _skip_if_done(out, "sample"):
        return out
    scfg = cfg.sample
    spec = policy_spec(cfg)
    sets = [("red-team", _load_rows(scfg.prompts, "red-team prompts"))]
    if scfg.helpfulness:
        sets.append(("helpfulness", _load_rows(scfg.helpfulness, "helpfulness prompts")))
    record = _record(cfg, out, "sample", spec)
    backend = load_backend(cfg.model.model_copy(update={"name": spec}))
    counts = {}
    for name, rows in sets:
        rows = shard_rows(rows, shard)
        rows = _fit(rows, backend, scfg.sampling.max_new_tokens, lambda chat: chat, scfg.prompts.too_long, name)
        data = sample_responses(rows, backend=backend, params=scfg.sampling.params(), out_path=out / f"{name}.jsonl",
                                k=scfg.k, seed=cfg.seed, chunk_size=scfg.chunk_size, clean=clean_output,
                                show_progress=show_progress, description=f"sampling {name}", set_name=name)
        counts[f"{name}_prompts"] = len(data)
        record.update(**counts)
    record.done(k=scfg.k, **counts)
    return out


def run_label(cfg: RunConfig, *, show_progress: bool = True, shard: str | None = None) -> Path:
    """Soft AI preference labels for the sampled pairs, into feedback/."""
    from cai.backends import load_backend
    from cai.constitution import FeedbackPrinciple, load_constitution
    from cai.stages.feedback import label_pairs, make_pairs, position_bias

    out = shard_dir(cfg, "label", shard)
    if _skip_if_done(out, "label"):
        return out
    source = _require(cfg, "sample", "label needs the sample stage's output in {source}; run `cai sample` with this config first")
    constitution = load_constitution(cfg.constitution)
    rows = read_jsonl(source / "red-team.jsonl") + read_jsonl(source / "helpfulness.jsonl")
    pairs, identical = make_pairs(rows, cfg.label.pairing)
    if not pairs:
        raise CaiError(f"every sampled pair in {source} has two identical responses; sample at a higher temperature")
    pairs = shard_rows(pairs, shard)
    if not pairs:  # a small set can leave a hash shard empty: nothing to label is a finished shard
        _record(cfg, out, "label", (cfg.label.feedback_model or cfg.model).name).done(pairs=0)
        return out
    model_cfg = cfg.label.feedback_model or cfg.model
    record = _record(cfg, out, "label", model_cfg.name)
    record.update(pairs=len(pairs), identical_pairs_dropped=identical)
    backend = load_backend(model_cfg)
    labelled = label_pairs(pairs, constitution=constitution, backend=backend, config=cfg.label,
                           out_path=out / "data.jsonl", seed=cfg.seed,
                           helpfulness_principle=FeedbackPrinciple("helpfulness", cfg.label.helpfulness_question),
                           show_progress=show_progress)
    p = [r["p_a"] for r in labelled]
    record.done(pairs=len(labelled), identical_pairs_dropped=identical, position_bias=position_bias(labelled),
                mean_p_a=round(sum(p) / len(p), 4), mean_confidence=round(sum(abs(x - 0.5) for x in p) / len(p) + 0.5, 4))
    return out


def run_pm(cfg: RunConfig, *, show_progress: bool = True) -> Path:
    """Train the preference model on the AI labels (+ helpfulness comparisons), into preference_model/."""
    from cai.train.common import write_model_card
    from cai.train.preference_model import mix_and_split, pairs_from_human_comparisons, pairs_from_labels, train_preference_model

    out = stage_dir(cfg, "pm")
    if _skip_if_done(out, "pm"):
        return out
    source = _require(cfg, "label", "pm needs AI feedback labels in {source}; run `cai label` with this config first")
    human = pairs_from_human_comparisons(cfg.pm.human_data) if cfg.pm.human_data else []
    train, held_out, counts = mix_and_split(pairs_from_labels(read_jsonl(source / "data.jsonl")), human, cfg.pm, cfg.seed)
    base = cfg.pm.base or cfg.model.name
    record = _record(cfg, out, "pm", base)
    record.update(**counts)
    metrics = train_preference_model(train, held_out, base=base, out_dir=out, config=cfg.pm, seed=cfg.seed,
                                     device=cfg.model.device, show_progress=show_progress)
    write_model_card(out, title=f"Preference model of run '{cfg.name}'", base_model=base,
                     summary=("Scalar-head preference model trained with a soft-label Bradley-Terry loss on AI "
                              f"feedback under the `{cfg.constitution}` constitution. Made by cai."),
                     facts={**counts, **metrics}, config_yaml=config_to_yaml(cfg))
    console.print(f"pm: held-out accuracy {metrics['eval_accuracy']} (before training {metrics['eval_accuracy_before']}), "
                  f"ECE {metrics['eval_ece']}")
    record.done(**{**counts, **metrics})
    return out


def run_rl(cfg: RunConfig, *, algo: str | None = None, show_progress: bool = True) -> list[Path]:
    """RL-CAI: PPO against the PM into rl_cai/, and/or DPO on the labels into rl_cai_dpo/."""
    algo = algo or cfg.rl.algo
    algos = ["ppo", "dpo"] if algo == "both" else [algo]
    return [_run_ppo(cfg, show_progress) if a == "ppo" else _run_dpo(cfg) for a in algos]


def _run_ppo(cfg: RunConfig, show_progress: bool) -> Path:
    from cai.train.common import write_model_card
    from cai.train.ppo import train_ppo

    out = stage_dir(cfg, "ppo")
    if _skip_if_done(out, "ppo"):
        return out
    pm = _require(cfg, "pm", "ppo needs the preference model in {source}; run `cai pm` with this config first")
    policy = policy_spec(cfg)
    rcfg = cfg.rl
    prompts = _load_rows(rcfg.prompts, "PPO red-team prompts")
    helpful = _load_rows(rcfg.helpfulness, "PPO helpfulness prompts") if rcfg.helpfulness else []
    eval_prompts = _load_rows(rcfg.eval_prompts, "PPO held-out prompts")
    # Prompts that can't fit with their answer are fitted now: a resume redraws the same batches.
    sizer = _TokenSizer(policy)
    budget = rcfg.sampling.max_new_tokens
    prompts = _fit(prompts, sizer, budget, lambda chat: chat, rcfg.prompts.too_long, "PPO red-team prompts")
    if helpful:
        helpful = _fit(helpful, sizer, budget, lambda chat: chat, rcfg.helpfulness.too_long, "PPO helpfulness prompts")
    eval_prompts = _fit(eval_prompts, sizer, budget, lambda chat: chat, rcfg.eval_prompts.too_long, "PPO held-out prompts")
    record = _record(cfg, out, "ppo", policy)
    metrics = train_ppo(prompts, helpful, eval_prompts, policy_spec=policy, pm_folder=pm, out_dir=out, config=rcfg,
                        seed=cfg.seed, device=cfg.model.device, show_progress=show_progress)
    log = read_jsonl(out / "train_log.jsonl")
    kls = [r["kl"] for r in log if "kl" in r]
    summary = {"steps": metrics["steps"], "eval_reward_start": metrics["eval_reward_start"],
               "eval_reward_end": metrics["eval_reward_end"], "max_kl": max(kls) if kls else None,
               "final_kl": kls[-1] if kls else None}
    write_model_card(out, title=f"RL-CAI (PPO) model of run '{cfg.name}'", base_model=policy,
                     summary=("Policy optimised with PPO against a preference model trained on AI feedback "
                              f"under the `{cfg.constitution}` constitution, with a KL penalty to the SL-CAI model."),
                     facts=summary, config_yaml=config_to_yaml(cfg))
    console.print(f"ppo: held-out PM reward {summary['eval_reward_start']} -> {summary['eval_reward_end']}, "
                  f"max KL {summary['max_kl']}")
    record.done(**summary)
    return out


def _run_dpo(cfg: RunConfig) -> Path:
    from cai.train.common import write_model_card
    from cai.train.dpo import train_dpo

    out = stage_dir(cfg, "dpo")
    if _skip_if_done(out, "dpo"):
        return out
    source = _require(cfg, "label", "dpo needs AI feedback labels in {source}; run `cai label` with this config first")
    policy = policy_spec(cfg)
    record = _record(cfg, out, "dpo", policy)
    metrics = train_dpo(read_jsonl(source / "data.jsonl"), policy_spec=policy, out_dir=out, config=cfg.rl,
                        seed=cfg.seed, device=cfg.model.device)
    write_model_card(out, title=f"RL-CAI (DPO) model of run '{cfg.name}'", base_model=policy,
                     summary=("Policy trained with DPO on AI-labelled preference pairs under the "
                              f"`{cfg.constitution}` constitution."), facts=metrics, config_yaml=config_to_yaml(cfg))
    record.done(**metrics)
    return out


def eval_models(cfg: RunConfig) -> dict[str, str]:
    """The models to compare: ``eval.models``, else the run's models that exist, in pipeline order."""
    if cfg.eval.models:
        return dict(cfg.eval.models)
    models = {"base": cfg.model.name}
    for name, stage in (("sl_cai", "sft"), ("rl_cai_ppo", "ppo"), ("rl_cai_dpo", "dpo")):
        if is_done(stage_dir(cfg, stage)):
            models[name] = str(stage_dir(cfg, stage))
    return models


def run_eval(cfg: RunConfig, *, show_progress: bool = True) -> Path:
    """Answers, pairwise judgements, Elo, PM scores, evasiveness and the revision curve, into eval/."""

    from cai.backends import load_backend
    from cai.constitution import load_constitution
    from cai.eval import evaluate as E

    out = stage_dir(cfg, "eval")
    if _skip_if_done(out, "eval"):
        return out
    ecfg = cfg.eval
    constitution = load_constitution(cfg.constitution)
    models = eval_models(cfg)
    if len(models) < 2 and not ecfg.mc_files:
        raise CaiError("eval compares at least two models: finish a training stage first or list eval.models")
    sets = {"red-team": _load_rows(ecfg.red_team, "held-out red-team prompts"),
            "helpfulness": _load_rows(ecfg.helpfulness, "held-out helpfulness prompts")}
    mc = []
    if ecfg.mc_files:
        from cai.eval.mc import load_mc_file

        mc = [(f, load_mc_file(f)) for f in ecfg.mc_files]
    record = _record(cfg, out, "eval", ", ".join(models))
    base_cfg = cfg.model

    def load(spec: str):
        return load_backend(base_cfg.model_copy(update={"name": spec}))

    answers = E.generate_answers(models, sets, out / "responses.jsonl", ecfg.sampling.params(), load, show_progress)
    traces = read_jsonl(stage_dir(cfg, "critique") / "data.jsonl")
    # Before the judge loads, so two engines never hold memory at once.
    transcripts = _transcripts(traces[: ecfg.transcripts], models, load, ecfg.sampling.params())
    judge = load_backend(ecfg.judge or cfg.label.feedback_model or cfg.model)
    judgements = E.judge_pairs(answers, constitution=constitution, judge=judge, label_config=cfg.label,
                               out_path=out / "judgements.jsonl", seed=cfg.seed, show_progress=show_progress)
    results: dict[str, Any] = {"models": list(models), "model_specs": models,
                               "elo": E.elo_by_axis(judgements, "base", ecfg.bootstrap, cfg.seed)}
    pm_folder = stage_dir(cfg, "pm")
    scorer = None
    if is_done(pm_folder):
        from cai.train.preference_model import RewardScorer

        scorer = RewardScorer.from_folder(pm_folder)
    pm_scores = dict(enumerate(scorer.score([a["prompt"] for a in answers], [a["response"] for a in answers]))) if scorer else None
    results["answers"] = E.answer_stats(answers, pm_scores)
    curve_traces = traces[: ecfg.revision_curve_traces]
    results["revision_curve"] = E.revision_curve(curve_traces, scorer) if scorer and curve_traces else {}
    results["transcripts"] = transcripts
    if mc:
        from cai.eval.mc import mc_eval

        results["mc_eval"] = [mc_eval(rows, judge, file=f).summary() for f, rows in mc]
    from cai.io import write_json_atomic

    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", E.results_markdown(results))
    console.print(E.results_markdown(results))
    record.done(models=len(models), answers=len(answers), judgements=len(judgements))
    return out


def _transcripts(traces: list, models: dict[str, str], load: Any, params: Any) -> list[dict[str, Any]]:
    """prompt -> initial -> critique -> revision -> final RL answer, for the report."""
    if not traces:
        return []
    last = list(models)[-1]
    answers = load(models[last]).generate([t["prompt"] for t in traces], params)
    rows = []
    for t, answer in zip(traces, answers):
        first = t["rounds"][0] if t["rounds"] else {}
        rows.append({"id": t["id"], "prompt": t["prompt"][-1]["content"], "initial": t["initial_response"],
                     "principle": first.get("principle_id"), "critique": first.get("critique"),
                     "revision": t["final_response"], "final_model": last, "final_answer": answer.strip()})
    return rows


def _read_sft_file(path: str) -> list:
    rows = read_jsonl(path) if Path(path).is_file() else None
    if rows is None:
        raise CaiError(f"sft.extra_data file {path} does not exist")
    chats = []
    for i, row in enumerate(rows, start=1):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise CaiError(f"{path} row {i} needs a 'messages' list ending with an assistant message")
        chats.append(messages)
    return chats
