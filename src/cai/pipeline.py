"""The whole pipeline from one `RunConfig`: check every input, record the run's config, then run
the stages of `cai.runs.STAGES` in order and write the report. Nothing else lives here: each
stage's work is in its own module, named in that table.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from cai.backends.vllm import require_vllm
from cai.config import RunConfig
from cai.config_loader import config_to_yaml, read_yaml
from cai.constitution_yaml import load_constitution
from cai.data import load_prompts
from cai.data.comparisons import read_comparisons, rlhf_sources
from cai.errors import CaiError
from cai.eval.refusal import load_over_refusal
from cai.io import ensure_dir, write_text_atomic
from cai.locks import acquire_folder, release_all, release_folder
from cai.models import check_model_spec
from cai.report.html import write_report
from cai.runs import BASELINE_STAGES, RL_STAGES, STAGES, changed_keys, first_stage_reading, get_stage, refuse_legacy_run
from cai.stages.sample import missing_rlcd_statements

console = Console(stderr=True)

REPORT = "report"
"""Not a stage (it has no folder or config section), but a place ``--from`` may restart at."""


def stages_of_run(cfg: RunConfig) -> list[str]:
    """The stages this run executes, in order: every stage, with only the RL ones ``rl.algo`` picks
    and the baselines ``baselines`` names."""
    return [s.name for s in STAGES if (s.name not in RL_STAGES or s.name in cfg.rl.algo)
            and (s.name not in BASELINE_STAGES or s.name in cfg.baselines)]


def check_inputs(cfg: RunConfig) -> None:
    """Everything checkable without a model, before the first stage starts: constitution, prompt
    sources, extra data files, that every stage's model exists, and that the run folder is writable."""
    constitution = load_constitution(cfg.constitution)
    if cfg.label.method == "rlcd" and not cfg.sample.rlcd:
        raise CaiError("label.method is rlcd, which labels contrast pairs by construction, but sample.rlcd is false; "
                       "set sample.rlcd=true so the sample stage draws them")
    if cfg.sample.rlcd and (missing := missing_rlcd_statements(constitution, cfg.constitution)):
        raise CaiError(missing)
    rl = [cfg.rl.ppo] + [getattr(cfg.rl, algo) for algo in ("rloo", "grpo") if algo in cfg.rl.algo]
    sources = [cfg.critique.prompts, cfg.critique.helpfulness, cfg.sample.prompts, cfg.sample.helpfulness,
               *[s for section in rl for s in (section.prompts, section.helpfulness, section.eval_prompts)],
               cfg.eval.red_team, cfg.eval.helpfulness]
    for source in sources:
        if source is not None:
            load_prompts(source.source, split=source.split, limit=1)
    if cfg.eval.over_refusal is not None:
        load_over_refusal(cfg.eval.over_refusal)  # every row: a malformed one is named now, not at eval
    for path in (cfg.sft.extra_data, *cfg.eval.mc_files):
        if path and not Path(path).exists() and not str(path).startswith("hf:"):
            raise CaiError(f"file {path} named in the config does not exist")
    # Human comparisons, every row: a malformed one is named now, not after the earlier stages.
    comparisons = [(cfg.pm.human_data, "helpfulness")] if cfg.pm.human_data else []
    if "rlhf" in cfg.baselines:
        comparisons += [(source, axis) for _, source, axis in rlhf_sources(cfg.rlhf)]
    for source, axis in comparisons:
        read_comparisons(source, axis)
    # Every stage's model too, so a typo in a late stage's model fails now, not hours in.
    models = {"model": cfg.model, "critique.critic": cfg.critique.critic,
              "label.feedback_model": cfg.label.feedback_model, "eval.judge": cfg.eval.judge}
    for key, model in models.items():
        if model is not None and model.backend in ("hf", "vllm"):
            check_model_spec(model.name, f"{key}.name")
    for algo in ("rloo", "grpo"):
        if algo in cfg.rl.algo and getattr(cfg.rl, algo).vllm.enabled:
            require_vllm(f"rl.{algo}.vllm.enabled")  # vLLM rollouts asked for where they can't run
    ensure_dir(cfg.run_dir)


def prepare_run(cfg: RunConfig, *, from_stage: str | None = None) -> None:
    """Record the run's config; refuse a changed config unless the user reruns from a stage.

    A rerun from a stage deletes that stage's output and every later one's.

    Raises:
        CaiError: an unknown stage; a changed config without ``--from``, or with a ``--from`` later
            than the first stage the change affects; a run folder from an older cai.
    """
    import shutil

    order = [s.name for s in STAGES] + [REPORT]
    if from_stage is not None and from_stage not in order:
        raise CaiError(f"unknown stage '{from_stage}'; stages are: {', '.join(order)}")
    refuse_legacy_run(cfg.run_dir)
    saved = cfg.run_dir / "config.yaml"
    if saved.is_file():
        from pydantic import ValidationError

        try:
            previous = RunConfig.model_validate(read_yaml(saved))
        except ValidationError as err:
            raise CaiError(f"{saved} no longer matches this version of cai ({err.errors()[0]['msg']}); "
                           "use another run name, or --from STAGE to redo it with the new config") from err
        # Where the run lives is not what it computes: a copied or renamed run folder is the same run.
        # Naming a baseline only adds a stage: finished stages stay valid, and eval sees the new model.
        # A baseline's own section matters only to a run that names it.
        changed = [k for k in changed_keys(previous.model_dump(), cfg.model_dump())
                   if k not in ("name", "runs_dir", "baselines")
                   and not (k.split(".")[0] in BASELINE_STAGES and k.split(".")[0] not in cfg.baselines)]
        first = min((order.index(first_stage_reading(key)) for key in changed), default=len(order))
        if from_stage is not None and changed and order.index(from_stage) > first:
            raise CaiError(
                f"the config change ({', '.join(changed[:5])}) affects the {order[first]} stage, which comes before "
                f"--from {from_stage}; use --from {order[first]}"
            )
        if from_stage is None and changed:
            raise CaiError(
                f"run '{cfg.name}' in {cfg.run_dir} was made with a different config (changed: {', '.join(changed[:5])}); "
                "use another name, or --from STAGE to redo that stage and everything after it"
            )
    if from_stage is not None:
        for name in order[order.index(from_stage):]:
            target = cfg.run_dir / (get_stage(name).folder if name != REPORT else "report.html")
            if target.is_dir():
                # Never delete a folder another process is writing: the stage's, or one of its shards'.
                busy = [target, *sorted(d for d in (target / "shards").glob("*") if d.is_dir())]
                try:
                    for folder in busy:
                        acquire_folder(folder, name)
                    shutil.rmtree(target)
                finally:
                    for folder in busy:
                        release_folder(folder)
            elif target.exists():
                target.unlink()
    write_text_atomic(saved, config_to_yaml(cfg))


def run_stage(cfg: RunConfig, name: str, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Run one stage by its name in `STAGES` (what each ``cai <stage>`` command does)."""
    try:
        return get_stage(name).runner()(cfg, shard=shard, show_progress=show_progress)
    finally:  # a stage that failed still holds its folder's lock; the next stage, or a rerun, must not wait
        release_all()


def run_all(cfg: RunConfig, *, from_stage: str | None = None, show_progress: bool = True) -> Path:
    """Every stage in order; finished stages are skipped, a partial one resumes. Returns the report."""
    check_inputs(cfg)
    prepare_run(cfg, from_stage=from_stage)
    for name in stages_of_run(cfg):
        started = time.time()
        console.rule(f"[bold]{name}")
        run_stage(cfg, name, show_progress=show_progress)
        console.print(f"{name}: {time.time() - started:.0f} s")
    return write_report(cfg.run_dir)

