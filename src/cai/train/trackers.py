"""TensorBoard / W&B logging of training metrics through accelerate, when the user asks for it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

from cai.errors import CaiError


def make_trackers(report_to: Sequence[str], out_dir: Path, project: str, config: dict[str, Any]) -> list[Any]:
    """TensorBoard / W&B loggers through accelerate, when the user asks for them (``report_to``)."""
    if not report_to:
        return []
    for tracker in report_to:
        package = {"tensorboard": "tensorboard", "wandb": "wandb"}[tracker]
        if importlib.util.find_spec(package) is None:
            raise CaiError(f"report_to: {tracker} needs the {package} package; install it with: pip install {package}")
    from accelerate import Accelerator

    accelerator = Accelerator(log_with=list(report_to), project_dir=str(out_dir))
    accelerator.init_trackers(project, config=flat_hparams(config))
    return [Tracker(accelerator)]


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested config as the flat scalars trackers take: ``{"lora": {"r": 8}}`` -> ``{"lora.r": 8}``.

    TensorBoard's hparams accept only numbers, strings and booleans; lists and None become strings.
    """
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


class Tracker:
    """One accelerate tracker set: ``log(values, step)`` as training goes, ``finish()`` at the end."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)

    def finish(self) -> None:
        self.accelerator.end_training()
