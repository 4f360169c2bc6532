"""RL-CAI with PPO: optimise the SL-CAI policy against the preference model, with a KL penalty.

TRL no longer ships PPO, so this is our own recipe, top to bottom. Each iteration:

1. **Rollout** — the policy samples answers to a batch of prompts (red-team + helpfulness mix).
2. **Score** — the PM scores each (prompt, answer); scores are normalised with running statistics
   and clipped. Per-token reward = -beta * KL(policy || reference) at every token, plus the score
   at the last token. The reference is the frozen starting policy (with LoRA: the same weights
   with the adapter switched off, so no second copy in memory).
3. **Advantages** — a value head on the policy's last hidden state; GAE; whitened advantages.
4. **Optimise** — several epochs of minibatches: clipped policy loss + value_coef * clipped value
   loss - entropy_coef * entropy, with gradient clipping.

Every iteration is logged to ``train_log.jsonl`` (reward, KL, entropy, clip fraction, value loss,
explained variance, response length, and time split into generation / scoring / optimisation);
held-out PM reward is measured at the start, every ``eval_every`` steps and at the end.
"""

from __future__ import annotations

import copy
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from cai.backends.base import SamplingParams, stable_seed
from cai.config import RLConfig
from cai.data import PromptRow
from cai.io import JsonlWriter
from cai.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    per_token_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from cai.progress import progress_bar
from cai.train.common import apply_lora, load_checkpoint, save_checkpoint, save_model_folder
from cai.train.preference_model import RewardScorer


class ValueHead(torch.nn.Module):
    """V(s) from the policy's final hidden state: one linear layer, started near zero."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.linear.weight, std=1e-3)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, Any]:
    """Left-pad prompts to P and right-pad responses to T: response token t sits at column P + t.

    Returns input_ids/attention_mask/position_ids [B, P+T], response_mask [B, T] and P.
    """
    p_len = max(len(p) for p in prompts)
    t_len = max(1, max(len(r) for r in responses))
    b = len(prompts)
    ids = torch.full((b, p_len + t_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, p_len + t_len), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, p_len - len(p):p_len] = torch.tensor(p)
        mask[i, p_len - len(p):p_len] = 1
        if r:
            ids[i, p_len:p_len + len(r)] = torch.tensor(r)
            mask[i, p_len:p_len + len(r)] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "response_mask": mask[:, p_len:].float(), "prompt_len": p_len}


def forward_response(model: Any, value_head: ValueHead | None, batch: dict[str, Any],
                     entropy: bool = True) -> dict[str, torch.Tensor]:
    """Log-probs [B,T], entropy [B,T] (when asked) and values [B,T] of a packed batch's response tokens."""
    p = batch["prompt_len"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], output_hidden_states=value_head is not None)
    logits = out.logits[:, p - 1:-1]
    result = {"logprobs": logprobs_from_logits(logits, batch["input_ids"][:, p:])}
    if entropy:
        result["entropy"] = entropy_from_logits(logits)
    if value_head is not None:
        result["values"] = value_head(out.hidden_states[-1][:, p - 1:-1])
    return result


def _to(batch: dict[str, Any], device: torch.device, rows: list[int] | None = None) -> dict[str, Any]:
    return {k: (v[rows] if rows is not None else v).to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_ppo(
    prompts: list[PromptRow],
    helpful_prompts: list[PromptRow],
    eval_prompts: list[PromptRow],
    *,
    policy_spec: str,
    pm_folder: str | Path,
    out_dir: str | Path,
    config: RLConfig,
    seed: int = 0,
    device: str = "auto",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run PPO; save the policy as an HF folder in ``out_dir``; return summary metrics."""
    from cai.backends.hf import HFBackend
    from cai.models import load_model

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    loaded = load_model(policy_spec, dtype=config.dtype, device=device)
    tokenizer, dev = loaded.tokenizer, loaded.device
    policy = apply_lora(loaded.model, config.lora)
    # Reference = the frozen starting policy: the adapter switched off with LoRA, else a frozen copy.
    reference = None if config.lora.enabled else copy.deepcopy(loaded.model).eval().requires_grad_(False)
    value_head = ValueHead(loaded.model.config.hidden_size).to(dev)
    scorer = RewardScorer.from_folder(pm_folder, batch_size=config.minibatch)
    backend = HFBackend(policy, tokenizer, batch_size=config.rollout_batch, reuse_prefix=False)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    kl_ctl = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon) if config.adaptive_kl
              else FixedKLController(config.kl_coef))
    moments = RunningMoments()
    checkpoint = out_dir / "checkpoint"
    state = load_checkpoint(checkpoint, policy, optimizer, extra={"value_head": value_head}) or {"step": 0}
    if "kl_ctl" in state:
        kl_ctl.load_state_dict(state["kl_ctl"])
        moments.load_state_dict(state["moments"])
    trackers = _trackers(config, out_dir)
    log = JsonlWriter(out_dir / "train_log.jsonl", fsync=False)
    params_sampling = config.sampling.params()
    evals: list[dict[str, float]] = list(state.get("evals", []))
    if not evals:
        evals.append({"step": 0, "eval_reward": _eval_reward(backend, scorer, eval_prompts, params_sampling)})
        log.write(evals[-1])
    with progress_bar("ppo", config.steps, enabled=show_progress) as advance:
        advance(state["step"], 0)
        for step in range(state["step"] + 1, config.steps + 1):
            # 1. Rollout -------------------------------------------------------------------
            started = time.perf_counter()
            batch_prompts = _prompt_batch(prompts, helpful_prompts, config, seed, step)
            policy.eval()
            generations = backend.generate_tokens(
                [r.messages for r in batch_prompts], params_sampling,
                seeds=[stable_seed(seed, "ppo", step, i) for i in range(len(batch_prompts))],
            )
            # A row that ended on EOS keeps the exact EOS it sampled, so stopping is part of the action.
            responses = [g.token_ids + ([g.end_token] if g.end_token is not None else []) for g in generations]
            gen_s = time.perf_counter() - started
            # 2. Score -------------------------------------------------------------------
            started = time.perf_counter()
            raw = torch.tensor(scorer.score([r.messages for r in batch_prompts], [g.text for g in generations]))
            score = raw
            if config.normalize_reward:
                moments.update(raw)
                score = (raw - moments.mean) / max(moments.std, 1e-6)
            if config.reward_clip:
                score = score.clamp(-config.reward_clip, config.reward_clip)
            batch = _to(pack([g.prompt_ids for g in generations], responses, tokenizer.pad_token_id), dev)
            mask = batch["response_mask"]
            old = _no_grad_in_chunks(policy, value_head, batch, config.minibatch)
            with (policy.disable_adapter() if reference is None else nullcontext()):
                ref = _no_grad_in_chunks(reference or policy, None, batch, config.minibatch)
            kl = kl_penalty(old["logprobs"], ref["logprobs"]) * mask
            rewards = per_token_rewards(score.to(dev), kl, mask, kl_ctl.value)
            advantages, returns = gae(rewards, old["values"], mask, config.gamma, config.lam)
            advantages = whiten(advantages, mask)
            score_s = time.perf_counter() - started
            # 3. Optimise ----------------------------------------------------------------
            started = time.perf_counter()
            # The policy stays in eval mode: with dropout on (LoRA's, say) the ratio to the old policy
            # would not start at 1 and the clipping would act on noise.
            stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction",
                                                              "value_clip_fraction", "approx_kl", "entropy")}
            order = list(range(len(generations)))
            for epoch in range(config.ppo_epochs):
                random.Random(f"{seed}:ppo:{step}:{epoch}").shuffle(order)
                for start in range(0, len(order), config.minibatch):
                    rows = order[start:start + config.minibatch]
                    mb = _to(batch, dev, rows)
                    new = forward_response(policy, value_head, mb)
                    m = mask[rows]
                    pg, clip_frac, approx_kl = policy_loss(new["logprobs"], old["logprobs"][rows], advantages[rows], m,
                                                           config.clip_range)
                    vf, vf_clip = value_loss(new["values"], old["values"][rows], returns[rows], m,
                                             config.clip_range_value)
                    entropy = masked_mean(new["entropy"], m)
                    loss = pg + config.value_coef * vf - config.entropy_coef * entropy
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    for key, value in (("policy_loss", pg), ("value_loss", vf), ("clip_fraction", clip_frac),
                                       ("value_clip_fraction", vf_clip), ("approx_kl", approx_kl), ("entropy", entropy)):
                        stats[key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
            opt_s = time.perf_counter() - started
            kl_per_seq = float(kl.sum(1).mean())
            kl_ctl.update(kl_per_seq, len(generations))
            record = {
                "step": step, "reward_mean": round(float(raw.mean()), 5), "reward_std": round(float(raw.std()), 5)
                if len(raw) > 1 else 0.0, "normalized_reward_mean": round(float(score.mean()), 5),
                "kl": round(kl_per_seq, 5), "kl_coef": kl_ctl.value,
                **{k: round(sum(v) / len(v), 5) for k, v in stats.items()},
                "explained_variance": explained_variance(old["values"], returns, mask),
                "response_length": float(mask.sum(1).mean()),
                "gen_s": round(gen_s, 3), "score_s": round(score_s, 3), "opt_s": round(opt_s, 3),
            }
            if step % config.eval_every == 0 or step == config.steps:
                evals.append({"step": step, "eval_reward": _eval_reward(backend, scorer, eval_prompts, params_sampling)})
                record["eval_reward"] = evals[-1]["eval_reward"]
            log.write(record)
            for tracker in trackers:
                tracker.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
            advance(1, int(mask.sum()))
            if step % config.save_every == 0 and step < config.steps:
                save_checkpoint(checkpoint, policy, optimizer,
                                {"step": step, "kl_ctl": kl_ctl.state_dict(), "moments": moments.state_dict(),
                                 "evals": evals}, extra={"value_head": value_head})
    log.close()
    for tracker in trackers:
        tracker.finish()
    policy.eval()
    save_model_folder(policy, tokenizer, out_dir)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in value_head.state_dict().items()}, str(out_dir / "value_head.safetensors"))
    import shutil

    shutil.rmtree(checkpoint, ignore_errors=True)
    return {"steps": config.steps, "eval_reward_start": evals[0]["eval_reward"], "eval_reward_end": evals[-1]["eval_reward"],
            "evals": evals}


def _no_grad_in_chunks(model: Any, value_head: ValueHead | None, batch: dict[str, Any],
                       size: int) -> dict[str, torch.Tensor]:
    """Old-policy / reference log-probs (and values) of a rollout batch, a minibatch at a time,
    without the full-vocabulary entropy: [B, T, V] logits for a whole batch don't fit a GPU."""
    parts: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, batch["input_ids"].shape[0], size):
            rows = list(range(start, min(start + size, batch["input_ids"].shape[0])))
            parts.append(forward_response(model, value_head, _to(batch, batch["input_ids"].device, rows), entropy=False))
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}


def _prompt_batch(prompts: list[PromptRow], helpful: list[PromptRow], config: RLConfig, seed: int,
                  step: int) -> list[PromptRow]:
    """A seeded rollout batch with ``helpfulness_ratio`` of helpfulness prompts."""
    rng = random.Random(f"{seed}:ppo-batch:{step}")
    n_help = round(config.rollout_batch * config.helpfulness_ratio) if helpful else 0
    n_red = config.rollout_batch - n_help
    return [rng.choice(prompts) for _ in range(n_red)] + [rng.choice(helpful) for _ in range(n_help)]


def _eval_reward(backend: Any, scorer: RewardScorer, prompts: list[PromptRow], params: SamplingParams) -> float:
    """Mean PM score of greedy answers to held-out prompts."""
    if not prompts:
        return float("nan")
    greedy = SamplingParams(max_new_tokens=params.max_new_tokens)
    backend.model.eval()
    texts = backend.generate([r.messages for r in prompts], greedy)
    scores = scorer.score([r.messages for r in prompts], texts)
    return round(sum(scores) / len(scores), 5)


def _trackers(config: RLConfig, out_dir: Path) -> list[Any]:
    """TensorBoard / W&B loggers through accelerate, when the user asks for them."""
    if not config.report_to:
        return []
    from accelerate import Accelerator

    accelerator = Accelerator(log_with=list(config.report_to), project_dir=str(out_dir))
    accelerator.init_trackers("cai-ppo", config=config.model_dump(mode="json"))
    return [_Tracker(accelerator)]


class _Tracker:
    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)

    def finish(self) -> None:
        self.accelerator.end_training()
