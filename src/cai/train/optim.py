"""The optimizer, its learning-rate schedule, and one update step, shared by the training loops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


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
