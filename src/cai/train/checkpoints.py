"""Resumable training checkpoints: weights, optimizer state and loop state, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from cai.errors import CaiError


def save_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    extra: dict[str, torch.nn.Module] | None = None) -> None:
    """Write a resumable checkpoint atomically: a crash mid-save leaves the previous one intact.

    ``extra`` modules (a value head, say) are saved beside the model as ``<name>.safetensors``.
    """
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=folder.parent))
    try:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        for name, module in (extra or {}).items():
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer,
                    extra: dict[str, torch.nn.Module] | None = None) -> dict[str, Any] | None:
    """Restore weights and optimizer state from a checkpoint folder; None when there is none."""
    if not (folder / "state.json").is_file():
        old = folder.with_name(folder.name + ".old")
        if not (old / "state.json").is_file():
            return None
        folder = old  # crashed between the two renames of save_checkpoint
    from safetensors.torch import load_file

    weights_dir = folder / "model"
    if (weights_dir / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(weights_dir / "adapter_model.safetensors")))
    else:
        state_dict = {}
        for shard in sorted(weights_dir.glob("*.safetensors")):
            state_dict.update(load_file(str(shard)))
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if unexpected:
            raise CaiError(f"checkpoint {folder} does not match the model (unexpected weights {unexpected[:3]}); delete it to start over")
    for name, module in (extra or {}).items():
        module.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return json.loads((folder / "state.json").read_text())
