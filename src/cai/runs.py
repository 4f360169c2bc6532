"""Run folders and stage manifests.

A run lives in ``runs/<name>/`` with one folder per stage. Each stage folder holds the resolved
config that made it (``config.yaml``) and a ``manifest.json``: status (running/done), counts,
timings, model, seed, config hash and library versions. A stage whose manifest says ``done`` is
finished; one that says ``running`` was interrupted and resumes from its own data.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import time
from pathlib import Path
from typing import Any

from cai import __version__
from cai.errors import CaiError
from cai.io import ensure_dir, write_json_atomic, write_text_atomic

STAGE_DIRS = {
    "critique": "critique_revision",
    "sft": "sl_cai",
    "sample": "samples",
    "label": "feedback",
    "pm": "preference_model",
    "ppo": "rl_cai",
    "dpo": "rl_cai_dpo",
    "eval": "eval",
}


def stage_dir(cfg: Any, stage: str) -> Path:
    return cfg.run_dir / STAGE_DIRS[stage]


def shard_dir(cfg: Any, stage: str, shard: str | None) -> Path:
    """Where a stage writes: its own folder, or ``<stage>/shards/i-of-N`` for one shard of it.

    A shard's manifest never marks the stage itself done; `merge_stage` does, once every shard is.
    """
    if shard is None:
        return stage_dir(cfg, stage)
    from cai.sharding import parse_shard

    index, count = parse_shard(shard)
    return stage_dir(cfg, stage) / "shards" / f"{index}-of-{count}"


STAGE_SECTIONS = {"critique": "critique", "sft": "sft", "sample": "sample", "label": "label", "pm": "pm",
                  "ppo": "rl", "dpo": "rl", "eval": "eval"}
"""The config section each stage reads, besides the shared keys (model, constitution, seed)."""


def stage_config_hash(cfg: Any, stage: str) -> str:
    """Hash of what one stage's output depends on: the shared keys and its own section.

    Changing another stage's section (say ``rl.steps``) doesn't invalidate this stage's data.
    """
    from cai.config_loader import config_hash_of

    data = cfg.model_dump(mode="json")
    own = STAGE_SECTIONS.get(stage)
    kept = {k: v for k, v in data.items()
            if k not in ("name", "runs_dir") and (k == own or k not in STAGE_SECTIONS.values())}
    return config_hash_of(kept)


def library_versions() -> dict[str, str]:
    versions = {"cai": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "accelerate", "peft", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a manifest is rewritten atomically; an unreadable one means "start over"


def is_done(stage_dir: str | Path) -> bool:
    manifest = read_manifest(stage_dir)
    return bool(manifest and manifest.get("status") == "done")


class StageRecord:
    """Writes a stage folder's manifest and config as the stage starts, progresses and ends."""

    def __init__(self, stage_dir: str | Path, stage: str, *, config_yaml: str, config_hash: str,
                 model: str, seed: int) -> None:
        self.dir = ensure_dir(stage_dir)
        previous = read_manifest(self.dir) or {}
        if previous.get("status") == "running" and previous.get("config_hash") not in (None, config_hash):
            # Resuming with another config would mix rows made two different ways in one file.
            raise CaiError(f"{self.dir} was started with a different {stage} config; restore that config to resume, "
                           "or delete the folder to start the stage over")
        self.started = time.time()
        self.manifest: dict[str, Any] = {
            "stage": stage,
            "status": "running",
            "counts": {},
            "model": model,
            "seed": seed,
            "config_hash": config_hash,
            "started_at": previous.get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "attempts": int(previous.get("attempts", 0)) + 1,
            "elapsed_s": float(previous.get("elapsed_s", 0.0)),
            "versions": library_versions(),
        }
        self._elapsed_before = self.manifest["elapsed_s"]
        write_text_atomic(self.dir / "config.yaml", config_yaml)
        self.save()

    def update(self, **counts: Any) -> None:
        self.manifest["counts"].update(counts)
        self.save()

    def save(self) -> None:
        self.manifest["elapsed_s"] = round(self._elapsed_before + time.time() - self.started, 2)
        write_json_atomic(self.dir / "manifest.json", self.manifest)

    def done(self, **counts: Any) -> None:
        self.manifest["counts"].update(counts)
        self.manifest["status"] = "done"
        self.manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()
