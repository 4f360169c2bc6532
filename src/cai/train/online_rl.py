"""RL-CAI with RLOO or GRPO through TRL: the policy samples several answers per prompt, the run's
preference model scores them, and each answer is pushed up or down by how it compares with the
other answers to the same prompt, with a KL penalty to the SL-CAI model.

The two differ only in the advantage and the loss (TRL's ``RLOOTrainer`` / ``GRPOTrainer``):

- **RLOO** (Ahmadian et al. 2024): advantage = reward - beta * KL(answer) minus the mean of the same
  over the *other* answers to the prompt (leave-one-out); the KL is a sequence-level reward penalty.
- **GRPO** (Shao et al. 2024): advantage = (reward - group mean) / group std; the KL (k3 estimate) is a
  per-token loss term with weight beta.

Unlike PPO (`cai.train.ppo`, our own) there is no value model: the group is the baseline, so one
policy copy (plus the frozen reference when beta > 0) is all that is trained and held. Rollouts use
transformers' ``generate`` or, on GPUs, vLLM (``rl.<algo>.vllm``: TRL's ``use_vllm`` / ``vllm_*``).
On a CPU the trainer runs in float32 without activation checkpointing, unlike TRL's defaults: bf16
matmuls are ~70x slower there, and checkpointing only costs compute.

Outputs, the same contract as PPO's so ``cai eval`` and the report read them alike: an HF model
folder with a model card, ``train_log.jsonl`` (one line per step: ``reward_mean``, ``kl`` in nats per
answer, ``entropy``, ``response_length`` and every metric TRL logged under its own name; plus
``eval_reward`` lines), and ``eval_reward_start`` / ``eval_reward_end`` in the manifest: the mean PM
score of greedy answers to held-out prompts, measured by the same function PPO uses.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Callable, Literal

from cai.backends.base import TokenCounter
from cai.backends.hf import HFBackend
from cai.backends.vllm import require_vllm
from cai.config import GRPOConfig, RLOOConfig, RunConfig
from cai.config_loader import config_to_yaml
from cai.data import PromptRow
from cai.data.prompt_sets import fit_prompt_set, load_prompt_set
from cai.errors import CaiError
from cai.io import JsonlWriter
from cai.models import load_model
from cai.progress import progress_bar
from cai.runs import StageRun, policy_spec
from cai.train.lora import peft_lora_config
from cai.train.model_folder import save_model_folder, write_model_card
from cai.train.pm import RewardScorer
from cai.train.ppo import eval_reward
from cai.types import Chat, SamplingParams

Algo = Literal["rloo", "grpo"]
TITLES = {"rloo": "RLOO", "grpo": "GRPO"}


def mix_prompts(red_team: list[PromptRow], helpful: list[PromptRow], ratio: float, seed: int) -> list[PromptRow]:
    """The rollout prompts: every red-team prompt plus helpfulness prompts making up ``ratio`` of the
    whole (capped by what exists), drawn with a seed. TRL shuffles them into batches."""
    wanted = round(len(red_team) * ratio / (1 - ratio)) if ratio else 0
    return list(red_team) + random.Random(f"{seed}:online-rl-mix").sample(list(helpful), min(wanted, len(helpful)))


def pm_reward(scorer: RewardScorer) -> Callable[..., list[float]]:
    """A TRL reward function: the preference model's score of each answer to its conversation.

    TRL calls it with conversational ``prompts`` (chats) and ``completions`` (each a one-message chat
    holding the answer), plus extra keywords it ignores; TRL logs it as ``rewards/preference_model/*``.
    """
    def preference_model(prompts: list[Chat], completions: list[Any], **_: Any) -> list[float]:
        answers = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return scorer.score(prompts, answers)

    return preference_model


def trl_config(config: RLOOConfig | GRPOConfig, *, out_dir: Path, on_gpu: bool, dtype: Any, seed: int) -> Any:
    """TRL's ``RLOOConfig`` or ``GRPOConfig`` for our section of that name: the one place they are mapped."""
    import torch
    import trl

    common = dict(
        output_dir=str(out_dir / "trainer"),
        max_steps=config.steps,
        per_device_train_batch_size=config.prompts_per_step * config.generations,
        num_generations=config.generations,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        beta=config.beta,
        learning_rate=config.learning_rate,
        num_iterations=config.iterations,
        epsilon=config.clip_range,
        max_grad_norm=config.max_grad_norm,
        # Mixed precision only on GPUs; on CPUs bf16 is ~70x slower than fp32 and checkpointing only costs compute.
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        activation_checkpointing=config.activation_checkpointing,
        disable_dropout=True,  # dropout would start the ratio to the sampling policy away from 1 (PPO: eval mode)
        logging_steps=1,
        save_strategy="steps", save_steps=config.save_every, save_total_limit=1,
        report_to=list(config.report_to),
        seed=seed,
        **config.vllm.trl_kwargs(),
    )
    if isinstance(config, RLOOConfig):
        return trl.RLOOConfig(**common, normalize_advantages=config.normalize_advantages)
    return trl.GRPOConfig(**common, scale_rewards=config.scale_rewards, loss_type=config.loss_type)


def stage_callback(backend: Any, scorer: RewardScorer, prompts: list[PromptRow], max_new_tokens: int,
                   eval_every: int, advance: Callable[[int, int], None]) -> Any:
    """A transformers callback that measures the held-out PM reward at the start, every ``eval_every``
    steps and at the last step, as PPO does, into the trainer's log history (which a checkpoint keeps,
    so a resumed run neither loses nor repeats them), and advances our progress bar each step."""
    from transformers import TrainerCallback

    params = SamplingParams(max_new_tokens=max_new_tokens)

    def measure(state: Any, model: Any) -> None:
        was_training = model.training
        reward = eval_reward(backend, scorer, prompts, params)
        model.train(was_training)  # TRL reads the mode to tell training rollouts from evaluation ones
        state.log_history.append({"step": state.global_step, "eval_reward": reward})

    class HeldOutReward(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
            advance(state.global_step, 0)  # steps a resumed run has already done
            if not any("eval_reward" in r and r["step"] == 0 for r in state.log_history):
                measure(state, model)

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
            if state.global_step % eval_every == 0 or state.global_step == state.max_steps:
                measure(state, model)
            advance(1, 0)

    return HeldOutReward()


def log_records(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``train_log.jsonl`` rows from TRL's log history: one per step, in the names PPO's log uses
    (``reward_mean``, ``reward_std``, ``kl`` per answer, ``entropy``, ``response_length``) next to TRL's
    own, and the ``eval_reward`` rows as they are. The final summary entry (train_runtime...) is dropped.

    TRL logs ``kl`` as a mean per token; times the mean answer length it is the mean summed KL per
    answer (nats), the unit of PPO's ``kl`` (for GRPO, whose KL is taken in the loss, approximately).
    """
    rows = []
    for entry in log_history:
        if "eval_reward" in entry:
            rows.append({"step": entry["step"], "eval_reward": entry["eval_reward"]})
        elif "reward" in entry:
            length = entry.get("completions/mean_length", 0.0)
            kl = entry.get("kl")
            rows.append({"step": entry["step"], "reward_mean": entry["reward"], "reward_std": entry.get("reward_std"),
                         "kl": round(kl * length, 5) if kl is not None else None, "kl_per_token": kl,
                         "entropy": entry.get("entropy"), "response_length": length,
                         **{k: v for k, v in entry.items() if k not in ("step", "reward", "reward_std", "kl", "entropy")}})
    return rows


def train_online_rl(
    algo: Algo,
    prompts: list[PromptRow],
    eval_prompts: list[PromptRow],
    *,
    policy_spec: str,
    pm_folder: str | Path,
    out_dir: str | Path,
    config: RLOOConfig | GRPOConfig,
    seed: int = 0,
    device: str = "auto",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train the policy with RLOO or GRPO (``algo``, whose section ``config`` is) against the preference
    model; save the HF folder to ``out_dir``.

    A rerun resumes from the last checkpoint TRL left in ``out_dir/trainer``.

    Returns:
        ``steps``, the held-out PM reward at the start and the end, every evaluation, and the log rows.

    Raises:
        CaiError: no prompts; vLLM asked for but unusable.
    """
    import trl
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    if not prompts:
        raise CaiError(f"{algo} has no rollout prompts; check rl.{algo}.prompts")
    if config.vllm.enabled:
        require_vllm(f"rl.{algo}.vllm.enabled")
    out_dir = Path(out_dir)
    loaded = load_model(policy_spec, dtype=config.dtype, device=device)
    on_gpu = loaded.device.type == "cuda"
    args = trl_config(config, out_dir=out_dir, on_gpu=on_gpu, dtype=loaded.dtype, seed=seed)
    scorer = RewardScorer.from_folder(pm_folder, batch_size=config.prompts_per_step * config.generations)
    trainer_class = trl.RLOOTrainer if algo == "rloo" else trl.GRPOTrainer
    trainer = trainer_class(
        model=loaded.model, reward_funcs=pm_reward(scorer), args=args,
        train_dataset=Dataset.from_list([{"prompt": list(r.messages)} for r in prompts]),
        processing_class=loaded.tokenizer,
        peft_config=peft_lora_config(config.lora, "CAUSAL_LM") if config.lora.enabled else None,
    )
    # The backend samples whatever weights the trainer holds now (with LoRA, the adapter-wrapped model).
    backend = HFBackend(trainer.model, loaded.tokenizer, batch_size=max(1, len(eval_prompts)), reuse_prefix=False)
    for noisy in (PrinterCallback, ProgressCallback):  # they print every log dict; our bar replaces them
        trainer.remove_callback(noisy)
    checkpoint = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    with progress_bar(algo, config.steps, enabled=show_progress and trainer.accelerator.is_main_process) as advance:
        trainer.add_callback(stage_callback(backend, scorer, eval_prompts, config.max_new_tokens, config.eval_every,
                                            advance))
        trainer.train(resume_from_checkpoint=checkpoint)
    rows = log_records(trainer.state.log_history)
    model = trainer.model
    model.eval()
    if trainer.accelerator.is_main_process:
        with JsonlWriter(out_dir / "train_log.jsonl", fsync=False) as log:
            for row in rows:
                log.write(row)
        save_model_folder(model, loaded.tokenizer, out_dir)
        shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    evals = [r for r in rows if "eval_reward" in r]
    return {"steps": trainer.state.global_step, "eval_reward_start": evals[0]["eval_reward"] if evals else None,
            "eval_reward_end": evals[-1]["eval_reward"] if evals else None, "evals": evals, "log": rows}


def run_online_rl(cfg: RunConfig, algo: Algo, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``rloo`` or ``grpo``: the SL-CAI policy against the run's preference model, into ``<algo>/``."""
    from rich.console import Console

    st = StageRun(cfg, algo, shard)
    config: RLOOConfig | GRPOConfig = getattr(cfg.rl, algo)
    name = TITLES[algo]
    red = load_prompt_set(config.prompts, f"{name} red-team prompts")
    helpful = load_prompt_set(config.helpfulness, f"{name} helpfulness prompts") if config.helpfulness else []
    eval_prompts = load_prompt_set(config.eval_prompts, f"{name} held-out prompts")
    if config.vllm.enabled:
        require_vllm(f"rl.{algo}.vllm.enabled")
    pm = st.require("pm")
    if st.skip():
        return st.dir
    policy = policy_spec(cfg)
    counter, budget = TokenCounter(policy), config.max_new_tokens
    red = fit_prompt_set(red, counter, budget, config.prompts.too_long, f"{name} red-team prompts")
    if helpful:
        helpful = fit_prompt_set(helpful, counter, budget, config.helpfulness.too_long, f"{name} helpfulness prompts")
    eval_prompts = fit_prompt_set(eval_prompts, counter, budget, config.eval_prompts.too_long, f"{name} held-out prompts")
    prompts = mix_prompts(red, helpful, config.helpfulness_ratio, cfg.seed)
    st.start(model=policy, prompts=len(prompts))
    metrics = train_online_rl(algo, prompts, eval_prompts, policy_spec=policy, pm_folder=pm, out_dir=st.dir,
                              config=config, seed=cfg.seed, device=cfg.model.device, show_progress=show_progress)
    kls = [r["kl"] for r in metrics["log"] if r.get("kl") is not None]
    summary = {"steps": metrics["steps"], "prompts": len(prompts), "eval_reward_start": metrics["eval_reward_start"],
               "eval_reward_end": metrics["eval_reward_end"], "max_kl": max(kls) if kls else None,
               "final_kl": kls[-1] if kls else None}
    write_model_card(st.dir, title=f"RL-CAI ({name}) model of run '{cfg.name}'", base_model=policy,
                     summary=(f"Policy optimised with {name} (TRL) against a preference model trained on AI feedback "
                              f"under the `{cfg.constitution}` constitution, with a KL penalty (beta {config.beta}) "
                              "to the SL-CAI model."),
                     facts=summary, config_yaml=config_to_yaml(cfg))
    Console(stderr=True).print(f"{algo}: held-out PM reward {summary['eval_reward_start']} -> "
                               f"{summary['eval_reward_end']}, max KL {summary['max_kl']}")
    st.done(**summary)
    return st.dir


def run_rloo(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``rloo``: RLOO of the SL-CAI policy against the preference model, into ``rloo/``."""
    return run_online_rl(cfg, "rloo", shard=shard, show_progress=show_progress)


def run_grpo(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``grpo``: GRPO of the SL-CAI policy against the preference model, into ``grpo/``."""
    return run_online_rl(cfg, "grpo", shard=shard, show_progress=show_progress)
