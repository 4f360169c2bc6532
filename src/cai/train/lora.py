"""LoRA adapters (peft) from our ``lora`` config section."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from cai.config import LoraConfig
from cai.errors import CaiError


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


@contextmanager
def adapters_folded(model: Any) -> Iterator[None]:
    """Run ``model`` (a peft LoRA model) with each adapter folded into a temporary copy of its layer's weight.

    Unfolded, every adapted layer of a decode step runs three products and peft's bookkeeping
    instead of one, and at PPO's small rollout batches that overhead is a large share of a step.
    peft's own merge adds the update into the weight in place and subtracts it afterwards, which
    leaves the weight a rounding error off each time; PPO's reference is this same model with its
    adapters switched off, so it would drift a little every step. Here each adapted weight is
    swapped for a new tensor ``W + delta W`` while the block runs, the adapters are switched off,
    and the original tensor is put back untouched afterwards, on error too. That costs one copy of
    the adapted weights while it lasts. Outputs match the unfolded model's up to float rounding; a
    sampled row can still take another token where its draw lands among the many tokens of tiny
    probability, whose boundaries a rounding error moves.

    Only float32 (or float64) weights are folded. In bfloat16 or float16 an update smaller than half
    a unit in the last place of its weight (2**-9 of it in bfloat16), which is most of an adapter's
    update early in training, would round away, and the rollouts would come from a policy close to
    the reference instead of the one PPO trains; such models, and a model without LoRA adapters or
    with one that can't be folded this way (a variant such as DoRA, a bias on the adapter, an
    already merged adapter, a base weight of another shape or a quantised one, an adapter on an
    embedding, a module trained whole beside the adapters, another kind of adapter), run unchanged.
    """
    folds = _foldable(model)
    if not folds:
        yield
        return
    originals = [(weight, weight.data) for _, _, weight in folds]
    try:
        with torch.no_grad():
            for layer, adapters, weight in folds:  # one layer's update at a time: one copy of the weights, not two
                delta = sum(layer.get_delta_weight(a) for a in adapters)
                weight.data = weight.data + delta.to(weight.dtype)  # a new tensor: the original is not written
        with model.disable_adapter():
            yield
    finally:
        for weight, data in originals:
            weight.data = data


def _foldable(model: Any) -> list[tuple[Any, list[str], torch.nn.Parameter]]:
    """(LoRA layer, its active adapters, its base weight) for every adapted layer; [] if any can't be folded."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:
        return []
    if not hasattr(model, "disable_adapter") or getattr(model, "_adapters_disabled", False):
        return []
    folds = []
    for layer in model.modules():
        if isinstance(layer, AuxiliaryTrainingWrapper) or (isinstance(layer, BaseTunerLayer)
                                                           and not isinstance(layer, LoraLayer)):
            return []  # a trained copy of a module, or another kind of adapter: switching adapters off would drop it
        if not isinstance(layer, LoraLayer):
            continue
        if any(a in getattr(layer, "lora_embedding_A", {}) for a in layer.active_adapters):
            return []  # an embedding's adapter: switching adapters off would drop it
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if not adapters:
            continue
        weight = getattr(layer.get_base_layer(), "weight", None)
        if (layer.merged or weight is None or weight.dtype not in (torch.float32, torch.float64)
                or any(a in getattr(layer, "lora_variant", {}) or layer.use_dora.get(a)
                       or getattr(layer, "lora_bias", {}).get(a) for a in adapters)):
            return []
        b, a = layer.lora_B[adapters[0]].weight, layer.lora_A[adapters[0]].weight
        shape = (b.shape[0], a.shape[1]) if not getattr(layer, "fan_in_fan_out", False) else (a.shape[1], b.shape[0])
        if shape != tuple(weight.shape):
            return []
        folds.append((layer, adapters, weight))
    return folds
