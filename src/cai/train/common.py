"""Library functions the training loops share: tokenising chats for loss on the answer only,
padding, learning-rate schedule, LoRA, resumable checkpoints and model cards.

Shared as plain functions, not a base class: each loop in ``cai.train`` reads top to bottom.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from cai.config import LoraConfig
from cai.errors import CaiError
from cai.io import write_text_atomic
from cai.types import Chat

IGNORE = -100


def tokenize_for_answer_loss(tokenizer: Any, messages: Chat, max_length: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels for one chat whose last message is the assistant answer to learn.

    Labels are ``-100`` on the prompt (everything up to the answer) so the loss covers only the
    assistant's tokens, including the end-of-turn marker that teaches it to stop. A chat longer
    than ``max_length`` loses tokens from the left of its prompt; if the answer alone is longer it
    is cut on the right. Returns None when nothing of the answer is left.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise CaiError("an SFT example must end with an assistant message")
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(list(messages), tokenize=False)
        if not full_text.startswith(prompt_text):
            raise CaiError("the model's chat template renders the prompt differently inside the full chat; "
                           "use prompt_format: text for this model")
        answer_text = full_text[len(prompt_text):]
    else:
        from cai.prompts import format_conversation

        prompt_text = format_conversation(list(messages[:-1])) + "\n\nAssistant:"
        answer_text = " " + messages[-1]["content"] + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        return None
    answer_ids = answer_ids[:max_length]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_length - len(answer_ids))):] if max_length > len(answer_ids) else []
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def pad_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (ids, labels) pairs into input_ids / attention_mask / labels tensors."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def warmup_linear_decay(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then linear decay to 10%."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.1, 1.0 - 0.9 * progress)


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    """Wrap a model with LoRA adapters when enabled (peft); otherwise return it unchanged."""
    if not lora.enabled:
        return model
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError as err:
        raise CaiError("LoRA needs the peft package; install it with: pip install peft") from err
    task = "SEQ_CLS" if "SequenceClassification" in type(model).__name__ else "CAUSAL_LM"
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, task_type=task)
    return get_peft_model(model, config)


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
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def total_steps(n_examples: int, batch_size: int, accumulation: int, epochs: int, max_steps: int | None) -> int:
    per_epoch = math.ceil(math.ceil(n_examples / batch_size) / accumulation)
    steps = per_epoch * epochs
    return min(steps, max_steps) if max_steps else steps
