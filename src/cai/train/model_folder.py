"""The HF model folder a training stage leaves: weights (a LoRA adapter merged in), tokenizer and a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cai.io import write_text_atomic


def save_model_folder(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save an HF model folder (safetensors) that transformers and every backend load as is.

    A LoRA model is saved with its adapter merged in, and the adapter alone is also kept in
    ``adapter/`` (load it with peft on top of the base model).
    """
    to_save = model
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(folder / "adapter", safe_serialization=True)
        to_save = model.merge_and_unload()
    to_save.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def write_model_card(folder: Path, *, title: str, base_model: str, summary: str, facts: dict[str, Any],
                     config_yaml: str) -> None:
    """A README.md model card: what this model is, what made it, and the config to rerun it."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    text = (
        "---\n"
        f"base_model: {base_model}\n"
        "library_name: transformers\n"
        "tags: [constitutional-ai, cai]\n"
        "---\n\n"
        f"# {title}\n\n{summary}\n\n"
        "| | |\n|---|---|\n" + rows + "\n\n"
        "## Resolved config\n\n```yaml\n" + config_yaml.rstrip() + "\n```\n"
    )
    write_text_atomic(folder / "README.md", text)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters) of a model, for its model card and metrics."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
