"""RL-CAI with PPO: optimise the SL-CAI policy against the preference model, with a KL penalty.

TRL no longer ships PPO, so this is our own recipe, top to bottom. Each iteration:

1. **Rollout** (`sample_rollout`) — the policy samples answers to a batch of prompts (red-team +
   helpfulness mix).
2. **Score** (`score_rollout`) — the PM scores each (prompt, answer); scores are normalised with
   running statistics and clipped.
3. **Advantages** (`compute_advantages`) — per-token reward = -beta * KL(policy || reference) at
   every token, plus the score at the last token. The reference is the frozen starting policy
   (with LoRA: the same weights with the adapter switched off, so no second copy in memory). A
   value head on the policy's last hidden state; GAE; whitened advantages.
4. **Optimise** (`optimise`) — several epochs of minibatches: clipped policy loss + value_coef *
   clipped value loss - entropy_coef * entropy, with gradient clipping.

Every iteration is logged to ``train_log.jsonl`` (reward, KL, entropy, clip fraction, value loss,
explained variance, response length, and time split into generation / scoring / optimisation);
held-out PM reward is measured at the start, every ``eval_every`` steps and at the end.

**Under ``accelerate launch``** (DDP, or DeepSpeed ZeRO-2) each of N processes rolls out every N-th
prompt of the global ``rollout_batch`` (with that row's seed, so the samples are the ones one process
would draw), scores its own rows, and trains on them; reward statistics, advantage whitening, the KL
that steers the coefficient and the logged figures are taken over all ranks, and each rank's loss is
weighted by its share of the batch's tokens, so the reduced gradient is the one-process gradient.
The main process writes the log, checkpoints and the model; a resumed run (every rank reads the
checkpoint) ends where an uninterrupted one would. FSDP and ZeRO-3 are refused with a sentence: each
process would hold a shard of the weights, while rollouts, the reference and checkpoints here use them
whole, and no path that gathers them has been built, because neither can run on CPU processes to test
it (accelerate 1.16 gives CPU processes DDP even under an FSDP config; DeepSpeed needs its package).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from cai.backends.base import TokenCounter
from cai.backends.hf import HFBackend
from cai.config import PPOConfig, RunConfig
from cai.config_loader import config_to_yaml
from cai.data import PromptRow
from cai.data.prompt_sets import fit_prompt_set, load_prompt_set
from cai.errors import CaiError
from cai.io import JsonlWriter, read_jsonl, write_text_atomic
from cai.losses.ppo import AdaptiveKLController, FixedKLController, RunningMoments
from cai.models import load_model
from cai.progress import progress_bar
from cai.runs import StageRun, policy_spec
from cai.train.checkpoints import load_checkpoint, save_checkpoint
from cai.train.lora import adapters_folded, apply_lora
from cai.train.model_folder import save_model_folder, write_model_card
from cai.train.optim import adamw
from cai.train.policy_forward import PolicyWithValue, ValueHead
from cai.train.ppo_steps import (
    PPOModels,
    compute_advantages,
    optimise,
    sample_rollout,
    score_rollout,
    step_record,
)
from cai.train.pm import RewardScorer
from cai.train.ranks import Ranks
from cai.train.trackers import make_trackers
from cai.types import SamplingParams


def train_ppo(
    prompts: list[PromptRow],
    helpful_prompts: list[PromptRow],
    eval_prompts: list[PromptRow],
    *,
    policy_spec: str,
    pm_folder: str | Path,
    out_dir: str | Path,
    config: PPOConfig,
    seed: int = 0,
    device: str = "auto",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run PPO; save the policy as an HF folder in ``out_dir``; return summary metrics.

    A rerun resumes from ``out_dir/checkpoint`` when an earlier run left one there. Under
    ``accelerate launch`` every process runs this function on its share of each batch.

    Returns:
        ``steps``, the held-out PM reward at the start and the end, and every evaluation.
    """
    out_dir = Path(out_dir)
    run = _setup(policy_spec, pm_folder, out_dir / "checkpoint", config, seed, device)
    ranks, evals = run.ranks, run.evals
    trackers = make_trackers(config.report_to, out_dir, "cai-ppo", config.model_dump(mode="json")) if ranks.is_main else []
    if ranks.is_main:
        keep_log_until(out_dir / "train_log.jsonl", run.done)
    log = JsonlWriter(out_dir / "train_log.jsonl", fsync=False) if ranks.is_main else None
    sampling = config.sampling.params()
    if not evals:
        evals.append({"step": 0, "eval_reward": eval_reward(run.models.backend, run.models.scorer, eval_prompts, sampling, ranks)})
        if log:
            log.write(evals[-1])
    with progress_bar("ppo", config.steps, enabled=show_progress and ranks.is_main) as advance:
        advance(run.done, 0)
        for step in range(run.done + 1, config.steps + 1):
            record, tokens = _iteration(run, step, prompts, helpful_prompts, sampling)
            if step % config.eval_every == 0 or step == config.steps:
                evals.append({"step": step,
                              "eval_reward": eval_reward(run.models.backend, run.models.scorer, eval_prompts, sampling, ranks)})
                record["eval_reward"] = evals[-1]["eval_reward"]
            if log:
                log.write(record)
            for tracker in trackers:
                tracker.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
            advance(1, tokens)
            if step % config.save_every == 0 and step < config.steps:
                if ranks.is_main:
                    save_ppo_checkpoint(run.checkpoint, run.models, run.optimizer, step, run.kl_ctl, run.moments, evals)
                run.accelerator.wait_for_everyone()
    if log:
        log.close()
    for tracker in trackers:
        tracker.finish()
    _save(run, out_dir)
    return {"steps": config.steps, "eval_reward_start": evals[0]["eval_reward"], "eval_reward_end": evals[-1]["eval_reward"],
            "evals": evals}


@dataclass
class _PPORun:
    """What the PPO loop works on, made by `_setup`, resumed from the checkpoint when there is one."""

    config: PPOConfig
    seed: int
    accelerator: Any
    ranks: Ranks
    models: PPOModels
    params: list[torch.nn.Parameter]
    """The trainable parameters (policy or its adapter, and the value head), clipped at each update."""
    wrapped: Any
    """Policy and value head as one module, after ``accelerator.prepare`` (DDP under several processes)."""
    optimizer: torch.optim.Optimizer
    kl_ctl: AdaptiveKLController | FixedKLController
    moments: RunningMoments
    """Running statistics of the PM scores, for reward normalisation."""
    checkpoint: Path
    done: int
    """The last step completed before this run (0 for a fresh one)."""
    evals: list[dict[str, float]]
    """Held-out evaluations so far: ``{"step", "eval_reward"}``."""


def _setup(policy_spec: str, pm_folder: str | Path, checkpoint: Path, config: PPOConfig, seed: int,
           device: str) -> _PPORun:
    """Load the models, make the optimizer and KL controller, and resume them all from ``checkpoint``."""
    torch.manual_seed(seed)
    accelerator = ppo_accelerator(config, device)
    ranks = Ranks(accelerator)
    models = load_ppo_models(policy_spec, pm_folder, config, device if ranks.count == 1 else str(accelerator.device))
    trainable = PolicyWithValue(models.policy, models.value_head)
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = adamw(params, learning_rate=config.learning_rate)
    kl_ctl = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon) if config.adaptive_kl
              else FixedKLController(config.kl_coef))
    moments = RunningMoments()
    done, evals = resume_ppo(checkpoint, models, optimizer, kl_ctl, moments)
    require_one_resume_step(done, ranks, checkpoint)
    wrapped, optimizer = accelerator.prepare(trainable, optimizer)
    return _PPORun(config=config, seed=seed, accelerator=accelerator, ranks=ranks, models=models, params=params,
                   wrapped=wrapped, optimizer=optimizer, kl_ctl=kl_ctl, moments=moments, checkpoint=checkpoint,
                   done=done, evals=evals)


def _iteration(run: _PPORun, step: int, prompts: list[PromptRow], helpful_prompts: list[PromptRow],
               sampling: SamplingParams) -> tuple[dict[str, Any], int]:
    """One PPO iteration: rollout, score, advantages, optimise, then the KL coefficient's update.

    Returns:
        (the iteration's log record, the answer tokens this rank trained on).
    """
    config, ranks = run.config, run.ranks
    lap = _stopwatch()
    rollout = sample_rollout(run.models, prompts, helpful_prompts, sampling, config, run.seed, step, ranks)
    gen_s = lap()
    scores = score_rollout(run.models.scorer, rollout, run.moments, config, ranks)
    ppo_batch = compute_advantages(run.models, rollout, scores.reward, run.kl_ctl.value, config,
                                   kl_estimator=config.kl_estimator, ranks=ranks)
    score_s = lap()
    stats = optimise(run.wrapped, run.accelerator, run.optimizer, run.params, ppo_batch, config, run.seed, step, ranks)
    opt_s = lap()
    kl_sum, rows = ranks.sum(float(ppo_batch.kl.sum()), ppo_batch.mask.shape[0])
    run.kl_ctl.update(kl_sum / rows, int(rows))
    record = step_record(step, scores, ppo_batch, stats, run.kl_ctl.value,
                         {"gen_s": gen_s, "score_s": score_s, "opt_s": opt_s}, ranks)
    return record, int(ppo_batch.mask.sum())


def _save(run: _PPORun, out_dir: Path) -> None:
    """Once every rank has finished: the main process saves the model and drops the checkpoint."""
    run.accelerator.wait_for_everyone()
    if run.ranks.is_main:
        save_ppo_outputs(run.models, out_dir)
        shutil.rmtree(run.checkpoint, ignore_errors=True)
    run.accelerator.wait_for_everyone()


def ppo_accelerator(config: PPOConfig, device: str) -> Any:
    """The run's ``Accelerator``, after checking that PPO can split its batches over its processes.

    Raises:
        CaiError: FSDP or ZeRO-3 (weights sharded; rollouts, reference and checkpoints use them whole),
            or a rollout batch or minibatch that the number of processes does not divide.
    """
    from accelerate import Accelerator, DistributedType

    accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
    n = accelerator.num_processes
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3):
        raise CaiError("PPO runs under DDP or DeepSpeed ZeRO-2 (configs/accelerate/ddp.yaml, deepspeed-zero2.yaml), "
                       "not FSDP or ZeRO-3: those keep a shard of the weights on each process, and PPO's rollouts, "
                       "reference and checkpoints use them whole; for a model whose optimizer state does not fit "
                       "one GPU, train a LoRA adapter under DDP (rl.ppo.lora.enabled=true)")
    if n > 1 and (config.rollout_batch % n or config.minibatch % n):
        raise CaiError(f"rl.ppo.rollout_batch ({config.rollout_batch}) and rl.ppo.minibatch ({config.minibatch}) "
                       f"must be multiples of the {n} processes, so every process trains on as many rows")
    return accelerator


def load_ppo_models(policy_spec: str, pm_folder: str | Path, config: PPOConfig, device: str) -> PPOModels:
    """The policy (with LoRA when enabled), its frozen reference, a new value head, the PM and a sampler."""
    loaded = load_model(policy_spec, dtype=config.dtype, device=device)
    policy = apply_lora(loaded.model, config.lora)
    # Reference = the frozen starting policy: the adapter switched off with LoRA, else a frozen copy.
    reference = None if config.lora.enabled else copy.deepcopy(loaded.model).eval().requires_grad_(False)
    value_head = ValueHead(loaded.model.config.hidden_size).to(loaded.device)
    scorer = RewardScorer.from_folder(pm_folder, device=device, batch_size=config.minibatch)
    backend = HFBackend(policy, loaded.tokenizer, batch_size=config.rollout_batch, reuse_prefix=False)
    return PPOModels(policy, reference, value_head, scorer, backend, loaded.tokenizer, loaded.device)


def resume_ppo(checkpoint: Path, models: PPOModels, optimizer: torch.optim.Optimizer, kl_ctl: Any,
               moments: RunningMoments) -> tuple[int, list[dict[str, float]]]:
    """Restore weights, optimizer, KL coefficient and reward statistics from ``checkpoint`` if there is one.

    Returns:
        (the last step completed, 0 for a fresh run; the held-out evaluations made so far).
    """
    state = load_checkpoint(checkpoint, models.policy, optimizer, extra={"value_head": models.value_head}) or {"step": 0}
    if "kl_ctl" in state:
        kl_ctl.load_state_dict(state["kl_ctl"])
        moments.load_state_dict(state["moments"])
    return state["step"], list(state.get("evals", []))


def keep_log_until(path: Path, done: int) -> None:
    """Cut ``train_log.jsonl`` back to the steps the checkpoint holds, so a resumed run logs each step once.

    A run stopped between checkpoints has logged steps that the resumed run redoes; a fresh start
    (``done`` 0) logs its step-0 evaluation again, so nothing is kept.
    """
    rows = read_jsonl(path, repair=True)
    kept = [row for row in rows if done and row["step"] <= done]
    if len(kept) < len(rows):
        write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))


def require_one_resume_step(done: int, ranks: Ranks, checkpoint: Path) -> None:
    """Every process read the checkpoint of the same step (each reads it for itself).

    Raises:
        CaiError: they did not (on several machines, ``checkpoint`` is not on a filesystem they share),
            rather than train ranks that disagree on the weights.
    """
    steps = ranks.gather_objects([done])
    if len(set(steps)) > 1:
        raise CaiError(f"the {ranks.count} processes found different PPO checkpoints in {checkpoint} (steps {steps}); "
                       "on several machines the run folder must be on a filesystem they all share")


def save_ppo_checkpoint(checkpoint: Path, models: PPOModels, optimizer: torch.optim.Optimizer, step: int,
                        kl_ctl: Any, moments: RunningMoments, evals: list[dict[str, float]]) -> None:
    """Everything ``resume_ppo`` needs to continue after ``step`` as if never stopped."""
    save_checkpoint(checkpoint, models.policy, optimizer,
                    {"step": step, "kl_ctl": kl_ctl.state_dict(), "moments": moments.state_dict(), "evals": evals},
                    extra={"value_head": models.value_head})


def save_ppo_outputs(models: PPOModels, out_dir: Path) -> None:
    """The trained policy as an HF folder (LoRA merged, adapter kept) and its value head beside it."""
    from safetensors.torch import save_file

    models.policy.eval()
    save_model_folder(models.policy, models.tokenizer, out_dir)
    save_file({k: v.contiguous() for k, v in models.value_head.state_dict().items()},
              str(out_dir / "value_head.safetensors"))


def _stopwatch() -> Callable[[], float]:
    """A lap timer for the log's time split: each call returns the seconds since the previous one."""
    last = time.perf_counter()

    def lap() -> float:
        nonlocal last
        now = time.perf_counter()
        seconds, last = now - last, now
        return seconds

    return lap


def eval_reward(backend: Any, scorer: RewardScorer, prompts: list[PromptRow], params: SamplingParams,
                 ranks: Ranks | None = None) -> float:
    """Mean PM score of greedy answers to held-out prompts (each rank answers its share)."""
    if not prompts:
        return float("nan")
    mine = ranks.share(prompts) if ranks is not None else prompts
    greedy = SamplingParams(max_new_tokens=params.max_new_tokens)
    backend.model.eval()
    with adapters_folded(backend.model):
        texts = backend.generate([r.messages for r in mine], greedy) if mine else []
    scores = scorer.score([r.messages for r in mine], texts) if mine else []
    if ranks is not None:
        scores = ranks.gather_objects(scores)
    return round(sum(scores) / len(scores), 5)



class PPOPrompts(NamedTuple):
    """The prompt sets PPO reads (``rl.ppo``): rollouts' red-team and helpfulness prompts, and the held-out ones."""

    red_team: list[PromptRow]
    helpful: list[PromptRow]
    held_out: list[PromptRow]


def load_ppo_prompts(pcfg: PPOConfig) -> PPOPrompts:
    """Read PPO's prompt sets (no model needed), so a bad source fails before anything loads."""
    return PPOPrompts(load_prompt_set(pcfg.prompts, "PPO red-team prompts"),
                      load_prompt_set(pcfg.helpfulness, "PPO helpfulness prompts") if pcfg.helpfulness else [],
                      load_prompt_set(pcfg.eval_prompts, "PPO held-out prompts"))


def fit_ppo_prompts(prompts: PPOPrompts, pcfg: PPOConfig, policy: str) -> PPOPrompts:
    """Fit prompts that can't hold their answer now (tokenizer only): a resume redraws the same batches."""
    counter = TokenCounter(policy)
    budget = pcfg.sampling.max_new_tokens
    red_team = fit_prompt_set(prompts.red_team, counter, budget, pcfg.prompts.too_long, "PPO red-team prompts")
    helpful = prompts.helpful
    if helpful:
        helpful = fit_prompt_set(helpful, counter, budget, pcfg.helpfulness.too_long, "PPO helpfulness prompts")
    held_out = fit_prompt_set(prompts.held_out, counter, budget, pcfg.eval_prompts.too_long, "PPO held-out prompts")
    return PPOPrompts(red_team, helpful, held_out)


def ppo_summary(metrics: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """A PPO run's manifest counts: steps, held-out PM reward at the start and end, largest and final KL."""
    kls = [r["kl"] for r in read_jsonl(out_dir / "train_log.jsonl") if "kl" in r]
    return {"steps": metrics["steps"], "eval_reward_start": metrics["eval_reward_start"],
            "eval_reward_end": metrics["eval_reward_end"], "max_kl": max(kls) if kls else None,
            "final_kl": kls[-1] if kls else None}


def describe_ppo(summary: dict[str, Any]) -> str:
    """The one line a PPO stage prints when it finishes."""
    return f"held-out PM reward {summary['eval_reward_start']} -> {summary['eval_reward_end']}, max KL {summary['max_kl']}"


def run_ppo(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``ppo``: PPO of the SL-CAI policy against the run's preference model, into ``ppo/``."""
    from rich.console import Console

    console = Console(stderr=True)
    st = StageRun(cfg, "ppo", shard)
    pcfg = cfg.rl.ppo
    prompts = load_ppo_prompts(pcfg)
    pm = st.require("pm")
    if st.skip():
        return st.dir
    policy = policy_spec(cfg)
    prompts = fit_ppo_prompts(prompts, pcfg, policy)
    st.start(model=policy)
    metrics = train_ppo(*prompts, policy_spec=policy, pm_folder=pm, out_dir=st.dir, config=pcfg,
                        seed=cfg.seed, device=cfg.model.device, show_progress=show_progress)
    summary = ppo_summary(metrics, st.dir)
    write_model_card(st.dir, title=f"RL-CAI (PPO) model of run '{cfg.name}'", base_model=policy,
                     summary=("Policy optimised with PPO against a preference model trained on AI feedback "
                              f"under the `{cfg.constitution}` constitution, with a KL penalty to the SL-CAI model."),
                     facts=summary, config_yaml=config_to_yaml(cfg))
    console.print(f"ppo: {describe_ppo(summary)}")
    st.done(**summary)
    return st.dir
