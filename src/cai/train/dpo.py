"""RL-CAI the cheaper way: DPO on the AI-labelled pairs, with TRL's DPOTrainer.

No preference model and no rollouts: the policy is pushed directly toward the chosen answer of
each labelled pair (chosen = the side with p_a > 0.5). Pairs whose label is less confident than
``rl.dpo.min_confidence`` can be dropped, and the soft labels' uncertainty can become DPO's label
smoothing (``rl.dpo.label_smoothing: auto``), which treats each label as right only with that
probability. Same output contract as PPO: an HF model folder with a model card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cai.config import DPOConfig, RunConfig
from cai.config_loader import config_to_yaml
from cai.errors import CaiError
from cai.io import JsonlWriter, read_jsonl
from cai.models import load_model
from cai.runs import StageRun, policy_spec
from cai.train.lora import peft_lora_config
from cai.train.model_folder import save_model_folder, write_model_card


def dpo_rows(labelled: list[dict[str, Any]], config: DPOConfig) -> tuple[list[dict[str, Any]], float]:
    """TRL preference rows kept for training, and the label smoothing to use."""
    kept = [r for r in labelled if r["score"] >= config.min_confidence and r["p_a"] != 0.5]
    if config.label_smoothing == "auto":
        smoothing = sum(1 - r["score"] for r in kept) / len(kept) if kept else 0.0
    else:
        smoothing = float(config.label_smoothing)
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in kept]
    return rows, round(min(max(smoothing, 0.0), 0.49), 4)


def train_dpo(
    labelled: list[dict[str, Any]],
    *,
    policy_spec: str,
    out_dir: str | Path,
    config: DPOConfig,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Train with DPO; save the merged HF model folder to ``out_dir``; return metrics."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows, smoothing = dpo_rows(labelled, config)
    if not rows:
        raise CaiError(f"no labelled pairs reach rl.dpo.min_confidence={config.min_confidence}; lower it")
    out_dir = Path(out_dir)
    loaded = load_model(policy_spec, dtype=config.dtype, device=device)
    on_gpu = loaded.device.type == "cuda"
    args = DPOConfig(
        output_dir=str(out_dir / "trainer"),
        beta=config.beta,
        label_smoothing=smoothing,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        max_length=config.max_length,
        # On CPUs bf16 is ~70x slower than fp32, and checkpointing only costs compute there.
        bf16=on_gpu and loaded.dtype.is_floating_point and str(loaded.dtype) == "torch.bfloat16",
        use_cpu=not on_gpu,
        activation_checkpointing=False,
        report_to=list(config.report_to),
        save_strategy="no",
        logging_steps=1,
        seed=seed,
    )
    peft_config = peft_lora_config(config.lora, "CAUSAL_LM") if config.lora.enabled else None
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


def run_dpo(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``dpo``: DPO of the SL-CAI policy on the AI-labelled pairs, into ``dpo/``."""
    st = StageRun(cfg, "dpo", shard)
    source = st.require("label")
    if st.skip():
        return st.dir
    policy = policy_spec(cfg)
    st.start(model=policy)
    metrics = train_dpo(read_jsonl(source / "data.jsonl"), policy_spec=policy, out_dir=st.dir, config=cfg.rl.dpo,
                        seed=cfg.seed, device=cfg.model.device)
    write_model_card(st.dir, title=f"RL-CAI (DPO) model of run '{cfg.name}'", base_model=policy,
                     summary=("Policy trained with DPO on AI-labelled preference pairs under the "
                              f"`{cfg.constitution}` constitution."), facts=metrics, config_yaml=config_to_yaml(cfg))
    st.done(**metrics)
    return st.dir
