"""Library functions the training loops share: tokenising chats for loss on the answer only,
padding, equal batches per rank, the optimizer with its learning-rate schedule and update step,
LoRA, resumable checkpoints and model cards.

Shared as plain functions, not a base class: each loop in ``cai.train`` reads top to bottom.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
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


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the causal LM under ``model`` (a peft or DDP wrapper or not) can compute logits at its last positions only."""
    import inspect

    model = getattr(model, "module", model)  # DDP
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of a `pad_batch` batch: the mean cross-entropy over its answer tokens.

    The same value as ``model(**batch).loss``, but the LM head runs only from the first position
    that predicts an answer token onwards: a prompt's positions never need the [T, vocabulary]
    logits (with a 49k vocabulary they and their softmax were the largest activations of a step).
    """
    labels = batch["labels"]
    predicts = (labels[:, 1:] != IGNORE).any(0).nonzero()  # position t predicts labels[:, t + 1]
    if not len(predicts) or not accepts_logits_to_keep(model):
        return model(**batch).loss
    first = int(predicts[0])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=labels.shape[1] - first).logits  # positions first .. T-1
    # Shift the labels, not the logits (a slice of the logits would be copied): position t is scored
    # on labels[t + 1], and the last position on nothing.
    targets = torch.nn.functional.pad(labels[:, first + 1:], (0, 1), value=IGNORE)
    return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE)


def answer_tokens(labels: Sequence[int]) -> int:
    """How many tokens of a row the causal-LM loss averages over (labels shift by one: the first predicts nothing)."""
    return sum(1 for label in labels[1:] if label != IGNORE)


def split_by_tokens(lengths: Sequence[int], max_tokens: int | None) -> list[list[int]]:
    """Positions ``0..n-1`` of a batch grouped into micro-batches of at most ``max_tokens`` padded tokens.

    Rows go longest first, so each micro-batch pads to its own longest row; a micro-batch is cut
    when one more row would make ``rows x longest`` exceed ``max_tokens`` (a single longer row still
    forms one alone). Activation memory grows with the tokens of one forward pass (about 1.8 MB per
    token for a 135M model in fp32), so this bounds it while the gradients, added up with each
    micro-batch's share of the loss, stay those of the whole batch.

    Args:
        lengths: the token length of each row (a row that is a pair of sequences: the longer of the two,
            with ``max_tokens`` halved by the caller).
        max_tokens: the budget; None or 0 keeps the batch whole (still ordered longest first).

    Returns:
        Lists of positions, every position exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not max_tokens:
        return [order] if order else []
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= max_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def micro_batch_tokens(value: int | None, device: torch.device | str) -> int | None:
    """The token budget of one forward pass: ``value`` when set, else 512 on a CPU and no limit on a GPU.

    On the reference 2-core CPU (bundled model, forward + backward of 1,600 tokens) passes of 400
    and 800 tokens took 5.0 s and 4.6 s against 6.3 s for one pass (the larger pass's activations
    fall out of cache), and held 2.2 and 1.4 GB less; a GPU wants the big batch.
    """
    if value:
        return value
    return 512 if torch.device(device).type == "cpu" else None


def adamw(params: Sequence[torch.nn.Parameter], *, learning_rate: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, with torch's fused kernel where the parameters' device has one (CPU and CUDA).

    The default (foreach) update builds full-size temporaries of the state; the fused one updates
    each tensor in one pass: on the bundled 135M model on 2 CPU cores a step took 0.08 s instead of
    0.28 s and its peak memory was 0.26 GB lower.
    """
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=fused or None)


def warmup_linear_decay(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then linear decay to 10%."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.1, 1.0 - 0.9 * progress)


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of each optimizer step: ``peak_lr`` times ``warmup_linear_decay``."""

    peak_lr: float
    total_steps: int
    warmup_steps: int

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based, counting the steps this rank takes)."""
        return self.peak_lr * warmup_linear_decay(step, self.total_steps, self.warmup_steps)


def make_optimizer_and_schedule(model: torch.nn.Module, *, learning_rate: float, weight_decay: float,
                                warmup_ratio: float, steps: int) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW, LRSchedule]:
    """AdamW over the model's trainable parameters, and its warm-up + linear-decay schedule.

    Args:
        model: the model to train (after LoRA, before ``accelerator.prepare``); frozen weights are left out.
        warmup_ratio: the share of ``steps`` spent warming up.
        steps: optimizer steps this rank will take in all, so the decay ends where training does.

    Returns:
        (params, optimizer, schedule): ``params`` is what to clip in ``optimizer_step``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, learning_rate=learning_rate, weight_decay=weight_decay)
    return params, optimizer, LRSchedule(learning_rate, steps, int(warmup_ratio * steps))


def optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], *, max_grad_norm: float,
                   lr: float | None = None, accelerator: Any = None) -> None:
    """One update from the accumulated gradients: clip their norm, set the learning rate, step, clear them.

    Args:
        params: the parameters whose gradient norm is clipped to ``max_grad_norm``.
        lr: this step's learning rate (``LRSchedule.lr(step)``); None keeps the optimizer's own.
        accelerator: when given, clipping goes through it, which knows how under FSDP, DeepSpeed and
            mixed precision; otherwise ``torch.nn.utils.clip_grad_norm_``.
    """
    if accelerator is not None:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    else:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def batches_for_rank(order: Sequence[int], batch_size: int, num_processes: int, process_index: int) -> list[list[int]]:
    """This rank's share of one epoch's batches, the same number on every rank.

    ``order`` (the epoch's shuffled example indices) is cut into batches of ``batch_size``; ranks take
    every ``num_processes``-th batch. A rank with fewer batches than the others would wait forever in
    DDP's all-reduce, so the first batches are repeated to fill the last round (what accelerate's
    ``even_batches`` does).

    Returns:
        Lists of example indices, ``ceil(ceil(len(order) / batch_size) / num_processes)`` of them.
    """
    batches = [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    batches += [batches[i % len(batches)] for i in range(-len(batches) % num_processes)]
    return batches[process_index::num_processes]


class Ranks:
    """This process's place among the training processes, and the few collectives an RL loop needs.

    With one process every method is the identity, so a single-process run computes exactly what
    it would without accelerate. Wraps an ``accelerate.Accelerator``.
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.index = accelerator.process_index
        self.count = accelerator.num_processes
        self.is_main = accelerator.is_main_process

    def share(self, items: Sequence[Any]) -> list[Any]:
        """This rank's items: every ``count``-th one, from its ``index``."""
        return list(items[self.index::self.count])

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, so counts and sums stay exact)."""
        if self.count == 1:
            return [float(v) for v in values]
        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(total, reduction="sum").tolist()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` [n, ...] concatenated in rank order (same n on every rank)."""
        if self.count == 1:
            return tensor
        return self.accelerator.gather(tensor.to(self.accelerator.device)).to(tensor.device)

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every rank's list of picklable items, concatenated in rank order (lengths may differ)."""
        if self.count == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(items)


def peft_lora_config(lora: LoraConfig, task_type: str) -> Any:
    """peft's ``LoraConfig`` for our ``lora`` config section: the one place the two are mapped.

    Args:
        lora: the ``lora`` section of a stage's config (read whether or not it is enabled).
        task_type: peft's task, ``"CAUSAL_LM"`` for a policy or ``"SEQ_CLS"`` for a preference model
            (peft then also trains the scalar head, which starts random).

    Returns:
        A ``peft.LoraConfig``, for ``get_peft_model`` or for TRL's ``peft_config=``.

    Raises:
        CaiError: peft is not installed.
    """
    try:
        from peft import LoraConfig as PeftLoraConfig
    except ImportError as err:
        raise CaiError("LoRA needs the peft package; install it with: pip install peft") from err
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type=task_type)


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    """Wrap a model with LoRA adapters when enabled (peft); otherwise return it unchanged."""
    if not lora.enabled:
        return model
    task = "SEQ_CLS" if "SequenceClassification" in type(model).__name__ else "CAUSAL_LM"
    config = peft_lora_config(lora, task)
    from peft import get_peft_model  # peft_lora_config has checked that peft is installed

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
    """(all parameters, trainable parameters) of a model, for its model card and metrics."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def total_steps(n_examples: int, batch_size: int, accumulation: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps one rank takes: ``batch_size`` is the global batch (per-rank size x ranks).

    The last, smaller group of an epoch still counts as a step; ``max_steps`` (when set) caps the total.
    """
    per_epoch = math.ceil(math.ceil(n_examples / batch_size) / accumulation)
    steps = per_epoch * epochs
    return min(steps, max_steps) if max_steps else steps


def make_trackers(report_to: Sequence[str], out_dir: Path, project: str, config: dict[str, Any]) -> list[Any]:
    """TensorBoard / W&B loggers through accelerate, when the user asks for them (``report_to``)."""
    if not report_to:
        return []
    import importlib.util

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
