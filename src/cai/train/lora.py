"""LoRA adapters (peft) from our ``lora`` config section."""

from __future__ import annotations

from typing import Any

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
