"""Run the whole pipeline from one `RunConfig`: input checks, config-change detection, every stage
in order (`cai.runners`), the report; plus merging of sharded stages and run status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from cai.config import RunConfig, config_hash, config_to_yaml
from cai.errors import CaiError
from cai.io import write_text_atomic
from cai.runners import (  # noqa: F401  (the stage runners are part of the pipeline's API)
    eval_models,
    policy_spec,
    run_critique,
    run_eval,
    run_label,
    run_pm,
    run_rl,
    run_sample,
    run_sft,
)
from cai.runs import STAGE_DIRS, StageRecord, is_done, read_manifest, shard_dir, stage_dir  # noqa: F401

console = Console(stderr=True)


SHARDABLE = {"critique": ("data.jsonl", "helpfulness.jsonl"), "sample": ("red-team.jsonl", "helpfulness.jsonl"),
             "label": ("data.jsonl",)}


def merge_stage(cfg: RunConfig, stage: str, count: int) -> Path:
    """Merge the N shard outputs of a generation stage (run on N machines) into the stage folder."""
    from cai.sharding import merge_shards

    if stage not in SHARDABLE:
        raise CaiError(f"only {', '.join(SHARDABLE)} can be sharded and merged, not '{stage}'")
    folder = stage_dir(cfg, stage)
    shards = [folder / "shards" / f"{i}-of-{count}" for i in range(count)]
    unfinished = [str(s) for s in shards if not is_done(s)]
    if unfinished:
        raise CaiError(f"cannot merge {stage}: shard(s) not finished: {', '.join(unfinished)}")
    record = StageRecord(folder, stage, config_yaml=config_to_yaml(cfg), config_hash=config_hash(cfg),
                         model=(read_manifest(shards[0]) or {}).get("model", ""), seed=cfg.seed)
    counts = {}
    for name in SHARDABLE[stage]:
        paths = [s / name for s in shards if (s / name).is_file()]
        if paths:
            counts[name.removesuffix(".jsonl").replace("-", "_") + "_rows"] = merge_shards(paths, folder / name)
    record.done(merged_shards=count, **counts)
    return folder


def stage_status(cfg: RunConfig) -> list[dict[str, Any]]:
    """Each stage's state for ``cai status``."""
    rows = []
    for stage, folder in STAGE_DIRS.items():
        manifest = read_manifest(cfg.run_dir / folder) or {}
        status = manifest.get("status", "not started")
        if not manifest and stage in ("ppo", "dpo") and cfg.rl.algo not in (stage, "both"):
            status = f"not in this run (rl.algo: {cfg.rl.algo})"
        rows.append({"stage": stage, "folder": folder, "status": status,
                     "counts": manifest.get("counts", {}), "elapsed_s": manifest.get("elapsed_s")})
    return rows


PIPELINE = ("critique", "sft", "sample", "label", "pm", "rl", "eval", "report")


def check_inputs(cfg: RunConfig) -> None:
    """Everything checkable without a model, before the first stage starts: constitution, prompt
    sources, extra data files, that every stage's model exists, and that the run folder is writable."""
    from cai.constitution import load_constitution
    from cai.data import load_prompts
    from cai.io import ensure_dir

    load_constitution(cfg.constitution)
    sources = [cfg.critique.prompts, cfg.critique.helpfulness, cfg.sample.prompts, cfg.sample.helpfulness,
               cfg.rl.prompts, cfg.rl.helpfulness, cfg.rl.eval_prompts, cfg.eval.red_team, cfg.eval.helpfulness]
    for source in sources:
        if source is not None:
            load_prompts(source.source, split=source.split, limit=1)
    for path in (cfg.sft.extra_data, cfg.pm.human_data, *cfg.eval.mc_files):
        if path and not Path(path).exists() and not str(path).startswith("hf:"):
            raise CaiError(f"file {path} named in the config does not exist")
    # Every stage's model too, so a typo in a late stage's model fails now, not hours in.
    from cai.models import _HUB_ID

    models = {"model": cfg.model, "critique.critic": cfg.critique.critic,
              "label.feedback_model": cfg.label.feedback_model, "eval.judge": cfg.eval.judge}
    for key, model in ((k, m) for k, m in models.items() if m is not None):
        if model.backend == "http" and not model.base_urls:
            raise CaiError(f"{key}.backend is http but {key}.base_urls is empty; give the server URLs "
                           "(e.g. http://localhost:8000/v1)")
        spec = model.name
        local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or not _HUB_ID.match(spec)
        if model.backend in ("hf", "vllm") and spec != "bundled" and local and not Path(spec).expanduser().exists():
            raise CaiError(f"{key}.name: model '{spec}' does not exist; give a model folder, a .gguf file, "
                           "'bundled' or a hub id")
    ensure_dir(cfg.run_dir)


def prepare_run(cfg: RunConfig, *, from_stage: str | None = None) -> None:
    """Record the run's config; refuse a changed config unless the user reruns from a stage.

    A rerun from a stage deletes that stage's output and every later one's.
    """
    import shutil

    from cai.config_loader import read_yaml

    saved = cfg.run_dir / "config.yaml"
    if from_stage is not None and from_stage not in PIPELINE:
        raise CaiError(f"unknown stage '{from_stage}'; stages are: {', '.join(PIPELINE)}")
    if saved.is_file():
        from pydantic import ValidationError

        try:
            previous = RunConfig.model_validate(read_yaml(saved))
        except ValidationError as err:
            raise CaiError(f"{saved} no longer matches this version of cai ({err.errors()[0]['msg']}); "
                           "use another run name, or --from STAGE to redo it with the new config") from err
        # Where the run lives is not what it computes: a copied or renamed run folder is the same run.
        changed = [k for k in _changed_keys(previous.model_dump(), cfg.model_dump()) if k not in ("name", "runs_dir")]
        first = min((_first_stage_affected(key) for key in changed), default=len(PIPELINE))
        if from_stage is not None and changed and PIPELINE.index(from_stage) > first:
            raise CaiError(
                f"the config change ({', '.join(changed[:5])}) affects the {PIPELINE[first]} stage, which comes before "
                f"--from {from_stage}; use --from {PIPELINE[first]}"
            )
        if from_stage is None and changed:
            raise CaiError(
                f"run '{cfg.name}' in {cfg.run_dir} was made with a different config (changed: {', '.join(changed[:5])}); "
                "use another name, or --from STAGE to redo that stage and everything after it"
            )
    if from_stage is not None:
        later = PIPELINE[PIPELINE.index(from_stage):]
        folders = {"rl": ["rl_cai", "rl_cai_dpo"], "report": ["report.html"]}
        for stage in later:
            for folder in folders.get(stage, [STAGE_DIRS.get(stage, stage)]):
                target = cfg.run_dir / folder
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    write_text_atomic(saved, config_to_yaml(cfg))


def _first_stage_affected(key: str) -> int:
    """Index in PIPELINE of the first stage whose output a changed config key can alter."""
    section = key.split(".")[0]
    stages = {"critique": "critique", "sft": "sft", "sample": "sample", "label": "label", "pm": "pm", "rl": "rl",
              "eval": "eval"}
    return PIPELINE.index(stages[section]) if section in stages else 0


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for k in sorted(set(old) | set(new)):
            keys += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


def run_all(cfg: RunConfig, *, from_stage: str | None = None, show_progress: bool = True) -> Path:
    """Every stage in order; finished stages are skipped, a partial one resumes. Returns the report."""
    import time

    from cai.report.html import write_report

    check_inputs(cfg)
    prepare_run(cfg, from_stage=from_stage)
    steps = {"critique": run_critique, "sft": run_sft, "sample": run_sample, "label": run_label, "pm": run_pm,
             "rl": run_rl, "eval": run_eval}
    for name, step in steps.items():
        started = time.time()
        console.rule(f"[bold]{name}")
        step(cfg, show_progress=show_progress)
        console.print(f"{name}: {time.time() - started:.0f} s")
    return write_report(cfg.run_dir)
