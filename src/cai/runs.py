"""Run folders, the table of stages, and the one context every stage runs in.

A run lives in ``runs/<name>/`` with one folder per stage. A stage has ONE name: the CLI command
(``cai label``), the run folder (``runs/demo/label/``) and the module (``cai/stages/label.py``)
share it, and `STAGES` below is the only list of stages: the CLI, the pipeline, ``cai status``,
``cai merge`` and the report all read it. Renaming a stage touches one line here.

Each stage folder holds the resolved config that made it (``config.yaml``) and a
``manifest.json``: status (running/done), counts, timings, peak memory, model, seed, config hash
and library versions. A stage whose manifest says ``done`` is finished; one that says
``running`` was interrupted and resumes from its own data. `StageRun` is the one place that
decides this: it refuses a stage folder made with a different config (naming the changed keys),
skips a finished one, checks that the stages it reads are finished, and records the manifest.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, get_args

from rich.console import Console

from cai import __version__
from cai.config import Baseline, RLAlgo, RunConfig, rl_algorithms
from cai.config_loader import config_hash_of, config_to_yaml, read_yaml
from cai.errors import CaiError
from cai.io import ensure_dir, write_json_atomic, write_text_atomic
from cai.locks import acquire_folder, release_folder
from cai.memory import peak_rss_gb, release_memory, reset_peak_rss
from cai.sharding import merge_shards, parse_shard

console = Console(stderr=True)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: the CLI command, the run folder and the module name.
        entry: ``module:function`` that runs the stage: ``function(cfg, *, shard, show_progress) -> Path``.
        sections: config sections (dotted paths) whose values change this stage's output, besides
            the shared top-level keys (model, constitution, seed).
        data_files: the JSONL files it writes, which `cai merge` joins for a sharded stage.
        shardable: whether ``--shard i/N`` may split it across machines.
        summary: one line for ``cai status`` and ``--help``.
    """

    name: str
    entry: str
    sections: tuple[str, ...]
    data_files: tuple[str, ...] = ()
    shardable: bool = False
    summary: str = ""

    @property
    def folder(self) -> str:
        return self.name

    def runner(self) -> Callable[..., Path]:
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(module), function)


STAGES: tuple[Stage, ...] = (
    Stage("critique", "cai.stages.critique:run_critique", ("critique",), ("data.jsonl", "helpfulness.jsonl"), True,
          "SL-CAI data: answers to red-team prompts, critiqued and revised"),
    Stage("sft", "cai.train.sft:run_sft", ("sft",), ("train_data.jsonl",), False,
          "SL-CAI model: fine-tuned on the revisions"),
    Stage("sample", "cai.stages.sample:run_sample", ("sample",), ("red-team.jsonl", "helpfulness.jsonl"), True,
          "RL-CAI data: K answers per prompt from the SL-CAI model"),
    Stage("label", "cai.stages.label:run_label", ("label",), ("data.jsonl",), True,
          "RL-CAI data: soft AI preference labels for the answer pairs"),
    Stage("pm", "cai.train.pm:run_pm", ("pm",), (), False,
          "preference model trained on the AI labels"),
    Stage("ppo", "cai.train.ppo:run_ppo", ("rl.ppo", "sample.policy"), ("train_log.jsonl",), False,
          "RL-CAI model: PPO against the preference model"),
    Stage("dpo", "cai.train.dpo:run_dpo", ("rl.dpo", "sample.policy"), (), False,
          "RL-CAI model: DPO on the AI-labelled pairs"),
    Stage("rloo", "cai.train.online_rl:run_rloo", ("rl.rloo", "sample.policy"), ("train_log.jsonl",), False,
          "RL-CAI model: RLOO (TRL) against the preference model"),
    Stage("grpo", "cai.train.online_rl:run_grpo", ("rl.grpo", "sample.policy"), ("train_log.jsonl",), False,
          "RL-CAI model: GRPO (TRL) against the preference model"),
    Stage("distill", "cai.train.distill:run_distill", ("distill", "critique.prompts", "critique.helpfulness",
          "critique.response", "critique.critic", "sft"), ("answers.jsonl", "train_data.jsonl"), False,
          "baseline: fine-tuned on the critic's own careful answers, no critique or revision"),
    Stage("rlhf", "cai.train.rlhf:run_rlhf", ("rlhf", "pm", "rl.ppo", "rl.dpo", "sample.policy"), ("train_log.jsonl",), False,
          "baseline: a preference model on human comparisons only, then the same RL"),
    Stage("eval", "cai.eval.evaluate:run_eval", ("eval", "label"), ("responses.jsonl", "judgements.jsonl"), False,
          "the models side by side: gold pairs, judged pairs, Elo"),
)
STAGE: dict[str, Stage] = {s.name: s for s in STAGES}
RL_STAGES: tuple[str, ...] = get_args(RLAlgo)
"""The stages `rl.algo` chooses between: one, several (``[ppo, rloo]``) or ``both`` (= ppo and dpo)."""
BASELINE_STAGES: tuple[str, ...] = get_args(Baseline)
"""The baseline stages, run only when ``baselines`` names them."""

LEGACY_FOLDERS = {"critique_revision": "critique", "sl_cai": "sft", "samples": "sample", "feedback": "label",
                  "preference_model": "pm", "rl_cai": "ppo", "rl_cai_dpo": "dpo"}
"""Stage folders of cai before 0.2, when a stage had three names; such runs are refused, not mixed."""

_SECTION_ROOTS = {s.split(".")[0] for stage in STAGES for s in stage.sections} | {"rl"}
# Where a run lives is not what it computes, and `baselines` (like `rl.algo`) only picks which stages run.
_NOT_CONTENT = ("name", "runs_dir", "baselines")


def get_stage(name: str) -> Stage:
    if name not in STAGE:
        raise CaiError(f"unknown stage '{name}'; stages are: {', '.join(STAGE)}")
    return STAGE[name]


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    return cfg.run_dir / get_stage(stage).folder


def shard_dir(cfg: RunConfig, stage: str, shard: str | None) -> Path:
    """Where a stage writes: its own folder, or ``<stage>/shards/i-of-N`` for one shard of it.

    A shard's manifest never marks the stage itself done; `merge_stage` does, once every shard is.
    """
    if shard is None:
        return stage_dir(cfg, stage)
    if not get_stage(stage).shardable:
        raise CaiError(f"only {', '.join(s.name for s in STAGES if s.shardable)} can be sharded, not '{stage}'")
    index, count = parse_shard(shard)
    return stage_dir(cfg, stage) / "shards" / f"{index}-of-{count}"


def policy_spec(cfg: RunConfig) -> str:
    """The policy RL-CAI starts from: ``sample.policy``, else this run's SL-CAI model (``sft/``)."""
    if cfg.sample.policy:
        return cfg.sample.policy
    sl = stage_dir(cfg, "sft")
    if not is_done(sl):
        raise CaiError(f"RL-CAI needs a policy: run `cai sft` first (expected a model in {sl}) "
                       "or set sample.policy=MODEL")
    return str(sl)


def stage_view(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """The part of a resolved config (as plain data) that one stage's output depends on.

    That is the shared top-level keys plus the stage's own sections, so changing another stage's
    section (say ``rl.ppo.steps``) doesn't invalidate this stage's data.
    """
    view = {k: v for k, v in config.items() if k not in _NOT_CONTENT and k not in _SECTION_ROOTS}
    for path in get_stage(stage).sections:
        node: Any = config
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        view[path] = node
    return view


def stage_config_hash(cfg: RunConfig, stage: str) -> str:
    return config_hash_of(stage_view(cfg.model_dump(mode="json"), stage))


def first_stage_reading(key: str) -> str:
    """The first stage (in `STAGES` order) whose output a changed dotted config key can alter."""
    for stage in STAGES:
        if stage.sections and any(key == s or key.startswith(s + ".") or s.startswith(key + ".")
                                  for s in stage.sections):
            return stage.name
    root = key.split(".")[0]
    for stage in STAGES:  # a key no stage reads (rl.algo) changes which stages of its section run
        if any(s.split(".")[0] == root for s in stage.sections):
            return stage.name
    return STAGES[0].name  # a shared key (model, seed, constitution): everything depends on it


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for k in sorted(set(old) | set(new)):
            keys += changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


def refuse_legacy_run(run_dir: Path) -> None:
    """A run folder made before stage folders were renamed can't resume: say so instead of mixing."""
    old = sorted(f for f in LEGACY_FOLDERS if (run_dir / f).is_dir())
    if old:
        renames = ", ".join(f"{f}/ -> {LEGACY_FOLDERS[f]}/" for f in old)
        raise CaiError(f"{run_dir} was made by an older cai whose stage folders had other names ({renames}) and "
                       "whose config format differs; start a new run (--set name=NEW) or delete that folder")


def library_versions() -> dict[str, str]:
    """Versions of cai, Python and the libraries it runs on (for manifests and `cai version`)."""
    versions = {"cai": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "accelerate", "peft", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a manifest is rewritten atomically; an unreadable one means "start over"


def is_done(folder: str | Path) -> bool:
    manifest = read_manifest(folder)
    return bool(manifest and manifest.get("status") == "done")


class StageRun:
    """One stage of one run: the skip/refuse/require/record logic every stage shares.

    Use::

        st = StageRun(cfg, "label", shard)      # takes the folder's lock; refuses a folder made with another config
        ...check inputs (constitution, prompts) -- a mistake fails even for a finished stage...
        if st.skip():                           # (gives the lock back)
            return st.dir
        source = st.require("sample")           # an earlier stage's folder, finished
        st.start(model=...)                     # manifest: running
        ...work, st.update(rows=n)...
        st.done(**counts)                       # manifest: done; gives the lock back
        return st.dir

    The lock (`cai.locks`) is held by this process from the constructor to ``done()``; a stage
    that raises keeps it until `cai.pipeline.run_stage` gives it back or the process ends (it is
    re-entrant, so the same process can run the stage again).

    Raises:
        CaiError: another process is writing the folder (naming it), the stage folder holds work made
            with a different config (the changed keys are named), or the run folder is from an older cai.
    """

    def __init__(self, cfg: RunConfig, name: str, shard: str | None = None) -> None:
        self.cfg = cfg
        self.stage = get_stage(name)
        self.name = name
        self.dir = shard_dir(cfg, name, shard)
        self.config_hash = stage_config_hash(cfg, name)
        self.manifest: dict[str, Any] = {}
        self._started = 0.0
        self._peak_before = 0.0
        refuse_legacy_run(cfg.run_dir)
        # One writer per folder: taken before the folder is read, held until done() (or skip(), or
        # the process ends); under `accelerate launch` rank 0 holds it for every rank.
        if _is_main_process():
            acquire_folder(self.dir, self.name)
        try:
            self._refuse_changed_config()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give back this stage's folder lock (done(), skip() and a failed require() do it for you)."""
        release_folder(self.dir)

    def _refuse_changed_config(self) -> None:
        previous = read_manifest(self.dir)
        if not previous or previous.get("config_hash") == self.config_hash:
            return
        saved = self.dir / "config.yaml"
        old = read_yaml(saved) if saved.is_file() else {}
        if self._same_with_new_defaults(old):
            return

        keys = changed_keys(stage_view(old if isinstance(old, dict) else {}, self.name),
                            stage_view(self.cfg.model_dump(mode="json"), self.name))
        what = f"changed: {', '.join(keys[:5])}" if keys else "its config hash differs"
        raise CaiError(
            f"{self.name}: {self.dir} was made with a different config ({what}); restore that config to "
            f"{'resume' if previous.get('status') == 'running' else 'reuse'} it, use another run name "
            f"(--set name=NEW), or delete the folder to redo the stage")

    def _same_with_new_defaults(self, old: Any) -> bool:
        """The saved config computes the same as this one once read by this cai: the hashes differ only
        because a newer cai added keys at their defaults (a run started before an upgrade resumes)."""
        from pydantic import ValidationError

        try:
            upgraded = RunConfig.model_validate(old)
        except ValidationError:
            return False
        return stage_config_hash(upgraded, self.name) == self.config_hash

    @property
    def finished(self) -> bool:
        return is_done(self.dir)

    def reopen(self, reason: str) -> None:
        """Treat a finished stage as unfinished (say why): its next run resumes from the rows it kept."""
        previous = read_manifest(self.dir)
        if previous and previous.get("status") == "done":
            console.print(f"{self.name}: {reason}; running it again (rows already written are kept)")
            write_json_atomic(self.dir / "manifest.json", {**previous, "status": "running"})

    def skip(self) -> bool:
        """True (and says so) when this stage already finished with this same config."""
        if self.finished:
            console.print(f"{self.name}: already done in {self.dir} with this config (delete the folder to redo it)")
            self.release()
            return True
        return False

    def require(self, name: str) -> Path:
        """The folder of an earlier stage this one reads; a clear error when it isn't finished."""
        source = stage_dir(self.cfg, name)
        if not is_done(source):
            self.release()
            raise CaiError(f"{self.name} needs the {name} stage's output in {source}; run `cai {name}` with this "
                           "config first")
        return source

    def start(self, model: str, **counts: Any) -> None:
        """Mark the stage running: write its resolved config and a manifest."""
        ensure_dir(self.dir)
        previous = read_manifest(self.dir) or {}
        self._started = time.time()
        release_memory()  # what earlier stages in this process freed is not this stage's memory
        reset_peak_rss()  # this stage's own peak, not an earlier stage's in the same process
        self._peak_before = float(previous.get("peak_rss_gb") or 0.0)  # an earlier attempt's
        self.manifest = {
            "stage": self.name,
            "status": "running",
            "counts": dict(counts),
            "model": model,
            "seed": self.cfg.seed,
            "config_hash": self.config_hash,
            "started_at": previous.get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "attempts": int(previous.get("attempts", 0)) + 1,
            "elapsed_s": float(previous.get("elapsed_s", 0.0)),
            "versions": library_versions(),
        }
        self._elapsed_before = self.manifest["elapsed_s"]
        if _is_main_process():
            write_text_atomic(self.dir / "config.yaml", config_to_yaml(self.cfg))
        self._save()

    def update(self, **counts: Any) -> None:
        self.manifest["counts"].update(counts)
        self._save()

    def done(self, **counts: Any) -> None:
        self.manifest["counts"].update(counts)
        self.manifest["status"] = "done"
        self.manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._save()
        self.release()

    def _save(self) -> None:
        self.manifest["elapsed_s"] = round(self._elapsed_before + time.time() - self._started, 2)
        self.manifest["peak_rss_gb"] = max(self._peak_before, peak_rss_gb())
        if _is_main_process():  # under `accelerate launch` every rank runs the stage; one records it
            write_json_atomic(self.dir / "manifest.json", self.manifest)


def _is_main_process() -> bool:
    """False on the ranks other than 0 of a ``torchrun``/``accelerate launch`` job (which set RANK)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def merge_stage(cfg: RunConfig, stage: str, count: int) -> Path:
    """Merge the N shard outputs of a generation stage (run on N machines) into the stage folder.

    Raises:
        CaiError: the stage isn't shardable, or a shard hasn't finished.
    """
    spec = get_stage(stage)
    if not spec.shardable:
        raise CaiError(f"only shardable stages can be merged, not '{stage}'")
    st = StageRun(cfg, stage)
    shards = [st.dir / "shards" / f"{i}-of-{count}" for i in range(count)]
    unfinished = [str(s) for s in shards if (read_manifest(s) or {}).get("status") != "done"]
    other = [str(s) for s in shards if (read_manifest(s) or {}).get("config_hash") != st.config_hash]
    if unfinished or other:
        st.release()
        raise CaiError(f"cannot merge {stage}: shard(s) not finished: {', '.join(unfinished)}" if unfinished else
                       f"cannot merge {stage}: shard(s) made with a different {stage} config: {', '.join(other)}")
    try:
        st.start(model=(read_manifest(shards[0]) or {}).get("model", ""))
        counts = _shared_counts(stage, shards)
        for name in spec.data_files:
            paths = [s / name for s in shards if (s / name).is_file()]
            if paths:
                counts[name.removesuffix(".jsonl").replace("-", "_") + "_rows"] = merge_shards(paths, st.dir / name)
        st.done(merged_shards=count, **counts)
    finally:
        st.release()
    return st.dir


SHARED_COUNTS = {"label": ("method", "method_chosen_by", "judge_methods", "labels_carry_signal", "gold_agreement",
                             "gold_agreement_ci", "gold_pairs_checked")}
"""Manifest counts every shard of a stage computes alike (the label stage's judging method and its
measurement, made on the same dev gold pairs), carried into the merged manifest."""


def _shared_counts(stage: str, shards: list[Path]) -> dict[str, Any]:
    """The shards' `SHARED_COUNTS`, which must agree: labels by two methods must not pass as one set.

    Raises:
        CaiError: the shards chose different methods.
    """
    keys = SHARED_COUNTS.get(stage, ())
    found = [{k: v for k, v in ((read_manifest(s) or {}).get("counts") or {}).items() if k in keys} for s in shards]
    methods = sorted({str(f.get("method")) for f in found if f.get("method")})
    if len(methods) > 1:
        raise CaiError(f"cannot merge {stage}: its shards labelled by different methods ({', '.join(methods)}); "
                       f"redo them with one named method (--set {stage}.method={methods[0]})")
    return dict(found[0]) if found else {}


def stage_status(run_dir: Path, rl_algo: str | list[str] | None = None,
                 baselines: list[str] | None = None) -> list[dict[str, Any]]:
    """Each stage's state for ``cai status``, the end-of-run summary and the report.

    Args:
        rl_algo: the run's ``rl.algo`` (a list, or one name or ``both`` as older configs saved it), so
            an RL stage it doesn't choose reads "not in this run".
    """
    try:
        picked = rl_algorithms(rl_algo) if rl_algo else None
    except ValueError:
        picked = None  # a saved config this cai can't read: say nothing rather than guess
    rows = []
    for stage in STAGES:
        manifest = read_manifest(run_dir / stage.folder) or {}
        status = manifest.get("status", "not started")
        if not manifest and picked and stage.name in RL_STAGES and stage.name not in picked:
            status = f"not in this run (rl.algo: {', '.join(picked)})"
        if not manifest and baselines is not None and stage.name in BASELINE_STAGES and stage.name not in baselines:
            status = "not in this run (baselines)"
        counts = manifest.get("counts", {})
        rows.append({"stage": stage.name, "status": status, "attempts": manifest.get("attempts"),
                     "elapsed_s": manifest.get("elapsed_s"), "peak_rss_gb": manifest.get("peak_rss_gb"),
                     "counts": counts,
                     "counts_text": ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, (dict, list)))})
    return rows
