"""RL-CAI the cheaper way: DPO on the AI-labelled pairs, with TRL's DPOTrainer.

No preference model and no rollouts: the policy is pushed directly toward the chosen answer of
each labelled pair (chosen = the side with p_a > 0.5). Pairs whose label is less confident than
``dpo_min_confidence`` can be dropped, and the soft labels' uncertainty can become DPO's label
smoothing (``dpo_label_smoothing: auto``), which treats each label as right only with that
probability. Same output contract as PPO: an HF model folder with a model card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai.config import RLConfig
from cai.errors import CaiError
from cai.io import JsonlWriter
from cai.train.common import save_model_folder


def dpo_rows(labelled: list[dict[str, Any]], config: RLConfig) -> tuple[list[dict[str, Any]], float]:
    """TRL preference rows kept for training, and the label smoothing to use."""
    kept = [r for r in labelled if r["score"] >= config.dpo_min_confidence and r["p_a"] != 0.5]
    if config.dpo_label_smoothing == "auto":
        smoothing = sum(1 - r["score"] for r in kept) / len(kept) if kept else 0.0
    else:
        smoothing = float(config.dpo_label_smoothing)
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in kept]
    return rows, round(min(max(smoothing, 0.0), 0.49), 4)


def train_dpo(
    labelled: list[dict[str, Any]],
    *,
    policy_spec: str,
    out_dir: str | Path,
    config: RLConfig,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Train with DPO; save the merged HF model folder to ``out_dir``; return metrics."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from cai.models import load_model

    rows, smoothing = dpo_rows(labelled, config)
    if not rows:
        raise CaiError(f"no labelled pairs reach dpo_min_confidence={config.dpo_min_confidence}; lower it")
    out_dir = Path(out_dir)
    loaded = load_model(policy_spec, dtype=config.dtype, device=device)
    on_gpu = loaded.device.type == "cuda"
    args = DPOConfig(
        output_dir=str(out_dir / "trainer"),
        beta=config.dpo_beta,
        label_smoothing=smoothing,
        num_train_epochs=config.dpo_epochs,
        per_device_train_batch_size=config.dpo_batch_size,
        learning_rate=config.dpo_learning_rate,
        max_length=config.dpo_max_length,
        # On CPUs bf16 is ~70x slower than fp32, and checkpointing only costs compute there.
        bf16=on_gpu and loaded.dtype.is_floating_point and str(loaded.dtype) == "torch.bfloat16",
        use_cpu=not on_gpu,
        activation_checkpointing=False,
        report_to=list(config.report_to),
        save_strategy="no",
        logging_steps=1,
        seed=seed,
    )
    peft_config = None
    if config.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig

        peft_config = PeftLoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                     target_modules=config.lora.target_modules, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=loaded.model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=loaded.tokenizer, peft_config=peft_config)
    result = trainer.train()
    with JsonlWriter(out_dir / "train_log.jsonl", fsync=False) as log:
        for entry in trainer.state.log_history:
            log.write(entry)
    model = trainer.model
    model.eval()
    save_model_folder(model, loaded.tokenizer, out_dir)
    import shutil

    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    margins = [e[k] for e in trainer.state.log_history for k in e if k.endswith("rewards/margins")]
    return {"pairs": len(rows), "label_smoothing": smoothing, "steps": trainer.state.global_step,
            "train_loss": round(result.training_loss, 5), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "last_reward_margin": margins[-1] if margins else None}
