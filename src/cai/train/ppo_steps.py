"""The four steps of one PPO iteration, each a function of typed containers: rollout, score,
advantages, optimise (and the iteration's log line). `cai.train.ppo` is the recipe that runs them.

Under several processes each step works on this rank's rows and takes its statistics over all
ranks through `cai.train.ranks.Ranks`; with one process those are the identity.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch

from cai.backends.base import stable_seed
from cai.config import PPOConfig
from cai.data import PromptRow
from cai.losses.ppo import (
    RunningMoments,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    per_token_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from cai.train.lora import adapters_folded
from cai.train.optim import optimizer_step
from cai.train.policy_forward import ValueHead, batch_to, forward_no_grad, pack
from cai.train.ranks import Ranks
from cai.train.pm import RewardScorer
from cai.types import SamplingParams


@dataclass
class PPOModels:
    """Everything a PPO run holds in memory besides the optimizer."""

    policy: Any
    reference: Any | None
    """The frozen starting policy; None with LoRA, where it is the policy with its adapter switched off."""
    value_head: ValueHead
    scorer: RewardScorer
    backend: Any
    """An ``HFBackend`` over ``policy``: rollouts and evaluations sample the current weights."""
    tokenizer: Any
    device: torch.device


@dataclass
class Rollout:
    """One iteration's samples: the prompts, their generations, and each response's token ids."""

    prompts: list[PromptRow]
    generations: list[Any]
    responses: list[list[int]]
    """Generated ids, plus the exact EOS sampled where a row stopped on one."""


@dataclass
class Scores:
    """PM scores of a rollout: ``raw`` [B] as the PM gave them, for the whole batch over all ranks;
    ``reward`` [b] normalised and clipped, for this rank's rows (b = B with one process)."""

    raw: torch.Tensor
    reward: torch.Tensor


@dataclass
class PPOBatch:
    """A scored rollout packed for the PPO losses. Shapes: B rollouts, T response tokens.

    ``batch`` is ``pack``'s output on the device; every tensor field is [B, T], zero off the response.
    """

    batch: dict[str, Any]
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    """Log-probs under the policy that sampled the rollout (before this iteration's updates)."""
    old_values: torch.Tensor
    kl: torch.Tensor
    """Per-token KL estimate of the policy to the reference, by ``kl_estimator``: the one the reward pays."""
    advantages: torch.Tensor
    """GAE advantages, whitened over the response tokens."""
    returns: torch.Tensor
    kl_k3: torch.Tensor
    """Per-token k3 estimate of the same KL, never negative: what the log and the report show as ``kl_k3``."""



def sample_rollout(models: PPOModels, prompts: list[PromptRow], helpful_prompts: list[PromptRow],
                   sampling: SamplingParams, config: PPOConfig, seed: int, step: int,
                   ranks: Ranks | None = None) -> Rollout:
    """Step 1: the policy answers a seeded batch of prompts (each row with its own seed).

    Under several processes each answers every N-th row of the global batch, with that row's seed.
    """
    batch_prompts = _prompt_batch(prompts, helpful_prompts, config, seed, step)
    rows = list(range(len(batch_prompts)))
    if ranks is not None:
        rows = ranks.share(rows)
    batch_prompts = [batch_prompts[i] for i in rows]
    models.policy.eval()
    with adapters_folded(models.policy):  # LoRA: one product per layer a decode step, the weights untouched after
        generations = models.backend.generate_tokens(
            [r.messages for r in batch_prompts], sampling, seeds=[stable_seed(seed, "ppo", step, i) for i in rows],
        )
    # A row that ended on EOS keeps the exact EOS it sampled, so stopping is part of the action.
    responses = [scored_tokens(g, models.tokenizer) + ([g.end_token] if g.end_token is not None else [])
                 for g in generations]
    return Rollout(batch_prompts, generations, responses)


def scored_tokens(generation: Any, tokenizer: Any) -> list[int]:
    """The generated ids that make up ``generation.text``, the answer the PM scores.

    A row that stopped on a stop string keeps that string's tokens in ``token_ids``, while its text
    is cut before it; training on them would credit tokens the PM never saw. The result is the
    shortest prefix of ``token_ids`` whose decoded text starts with the scored text (a last token
    that straddles the cut stays: part of it was scored), and at least one token, so that an answer
    stopped at once still has its one action to credit.
    """
    ids = list(generation.token_ids)
    if not (generation.ended and generation.end_token is None):
        return ids  # stopped on EOS (kept separately) or at the length limit: every id was scored
    text = generation.text
    k = len(ids)  # walk back from the end: the stop string is a few tokens at most
    while k > 1 and tokenizer.decode(ids[:k - 1], skip_special_tokens=True).startswith(text):
        k -= 1
    return ids[:k]


def score_rollout(scorer: RewardScorer, rollout: Rollout, moments: RunningMoments, config: PPOConfig,
                  ranks: Ranks | None = None) -> Scores:
    """Step 2: PM scores, normalised with running statistics (updated here) and clipped, as configured.

    The statistics are those of the whole batch, over every rank; ``raw`` holds the whole batch's
    scores (for the log), ``reward`` this rank's rows.
    """
    raw = torch.tensor(scorer.score([r.messages for r in rollout.prompts], [g.text for g in rollout.generations]))
    everyone = ranks.gather(raw) if ranks is not None else raw
    reward = raw
    if config.normalize_reward:
        moments.update(everyone)
        reward = (raw - moments.mean) / max(moments.std, 1e-6)
    if config.reward_clip:
        reward = reward.clamp(-config.reward_clip, config.reward_clip)
    return Scores(everyone, reward)


def compute_advantages(models: PPOModels, rollout: Rollout, reward: torch.Tensor, kl_coef: float, config: PPOConfig,
                       *, kl_estimator: Literal["k1", "k2", "k3", "abs"] = "k1", ranks: Ranks | None = None) -> PPOBatch:
    """Step 3: per-token rewards (-kl_coef * KL to the reference, plus ``reward`` [B] at the last token),
    values and GAE advantages of the rollout under the policy that sampled it.

    Args:
        kl_estimator: which per-token KL estimate penalises the reward (``cai.losses.ppo.kl_penalty``);
            the same tensor is logged as ``kl`` and steers adaptive KL.
        ranks: with several processes, advantages are whitened over every rank's tokens.
    """
    batch = batch_to(pack([g.prompt_ids for g in rollout.generations], rollout.responses, models.tokenizer.pad_token_id),
                models.device)
    mask = batch["response_mask"]
    old = forward_no_grad(models.policy, models.value_head, batch, config.minibatch)
    with (models.policy.disable_adapter() if models.reference is None else nullcontext()):
        ref = forward_no_grad(models.policy if models.reference is None else models.reference, None, batch,
                                 config.minibatch)
    kl = kl_penalty(old["logprobs"], ref["logprobs"], kl_estimator) * mask
    rewards = per_token_rewards(reward.to(models.device), kl, mask, kl_coef)
    advantages, returns = gae(rewards, old["values"], mask, config.gamma, config.lam)
    whitened = whiten(advantages, mask) if ranks is None or ranks.count == 1 else whiten_across(advantages, mask, ranks)
    kl_k3 = kl if kl_estimator == "k3" else kl_penalty(old["logprobs"], ref["logprobs"], "k3") * mask
    return PPOBatch(batch, mask, old["logprobs"], old["values"], kl, whitened, returns, kl_k3)


def whiten_across(x: torch.Tensor, mask: torch.Tensor, ranks: Ranks, eps: float = 1e-8) -> torch.Tensor:
    """`whiten` with the mean and (population) variance of the masked entries of every rank's ``x``."""
    total, count = ranks.sum(float((x * mask).sum()), float(mask.sum()))
    mean = total / count
    (squares,) = ranks.sum(float((((x - mean) ** 2) * mask).sum()))
    out = (x - mean) * torch.rsqrt(torch.tensor(squares / count + eps, dtype=x.dtype))
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def optimise(wrapped: Any, accelerator: Any, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
             ppo_batch: PPOBatch, config: PPOConfig, seed: int, step: int, ranks: Ranks) -> dict[str, float]:
    """Step 4: ``epochs`` seeded passes of minibatches over the rollout, one optimizer step each, of
    clipped policy loss + value_coef * clipped value loss - entropy_coef * entropy.

    Args:
        wrapped: the `PolicyWithValue` as ``accelerator.prepare`` returned it (DDP-wrapped on several
            processes), so that backward reduces the gradients.
        ranks: with N processes each trains on ``minibatch / N`` of its own rows per step; its loss is
            scaled by its share of the step's tokens times N, so the averaged gradient is the gradient
            of the token mean over the whole minibatch, as on one process.

    Returns:
        The mean over minibatches of each loss statistic (token-weighted over the ranks).
    """
    # The policy stays in eval mode: with dropout on (LoRA's, say) the ratio to the old policy
    # would not start at 1 and the clipping would act on noise.
    names = ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl", "entropy")
    weighted: list[list[float]] = []
    order = list(range(ppo_batch.mask.shape[0]))
    size = config.minibatch // ranks.count
    device = next(p for p in wrapped.parameters()).device
    for epoch in range(config.epochs):
        random.Random(f"{seed}:ppo:{step}:{epoch}").shuffle(order)
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            new = wrapped(batch_to(ppo_batch.batch, device, rows))
            m = ppo_batch.mask[rows]
            pg, clip_frac, approx_kl = policy_loss(new["logprobs"], ppo_batch.old_logprobs[rows],
                                                   ppo_batch.advantages[rows], m, config.clip_range)
            vf, vf_clip = value_loss(new["values"], ppo_batch.old_values[rows], ppo_batch.returns[rows], m,
                                     config.clip_range_value)
            entropy = masked_mean(new["entropy"], m)
            loss = pg + config.value_coef * vf - config.entropy_coef * entropy
            tokens = float(m.sum())
            (all_tokens,) = ranks.sum(tokens)
            share = tokens / all_tokens
            accelerator.backward(loss * (share * ranks.count))
            optimizer_step(optimizer, params, max_grad_norm=config.max_grad_norm, accelerator=accelerator)
            weighted.append([(float(v.detach()) if torch.is_tensor(v) else float(v)) * share
                             for v in (pg, vf, clip_frac, vf_clip, approx_kl, entropy)])
    totals = ranks.sum(*[sum(column) for column in zip(*weighted)])
    return {name: total / len(weighted) for name, total in zip(names, totals)}


def step_record(step: int, scores: Scores, ppo_batch: PPOBatch, stats: dict[str, float], kl_coef: float,
                seconds: dict[str, float], ranks: Ranks) -> dict[str, Any]:
    """One iteration's line of ``train_log.jsonl``: reward, KL, loss statistics, lengths and time split,
    each over the whole batch (every rank's rows).

    ``kl_coef`` is the coefficient after this iteration's update; ``seconds`` maps gen_s/score_s/opt_s
    (the main process's).
    """
    raw, mask = scores.raw, ppo_batch.mask
    rows, reward_sum, kl_sum, k3_sum, tokens = ranks.sum(mask.shape[0], float(scores.reward.sum()),
                                                         float(ppo_batch.kl.sum()), float(ppo_batch.kl_k3.sum()),
                                                         float(mask.sum()))
    if ranks.count == 1:
        ev = explained_variance(ppo_batch.old_values, ppo_batch.returns, mask)
    else:  # from sums over the ranks: Var = E[x^2] - E[x]^2 of the returns and of the critic's errors
        r, e = ppo_batch.returns.double() * mask, (ppo_batch.returns.double() - ppo_batch.old_values.double()) * mask
        sr, sr2, se, se2 = ranks.sum(float(r.sum()), float((r * r).sum()), float(e.sum()), float((e * e).sum()))
        var_r, var_e = sr2 / tokens - (sr / tokens) ** 2, se2 / tokens - (se / tokens) ** 2
        ev = float("nan") if var_r <= 0 else 1.0 - var_e / var_r
    return {
        "step": step, "reward_mean": round(float(raw.mean()), 5),
        "reward_std": round(float(raw.std()), 5) if len(raw) > 1 else 0.0,
        "normalized_reward_mean": round(reward_sum / rows, 5),
        # "kl" is the penalty's estimate per answer (k1 by default: a single answer's can be negative);
        # "kl_k3" estimates the same KL per answer and is never negative.
        "kl": round(kl_sum / rows, 5), "kl_k3": round(k3_sum / rows, 5), "kl_coef": kl_coef,
        **{k: round(v, 5) for k, v in stats.items()},
        "explained_variance": ev,
        "response_length": tokens / rows,
        **{k: round(v, 3) for k, v in seconds.items()},
    }


def _prompt_batch(prompts: list[PromptRow], helpful: list[PromptRow], config: PPOConfig, seed: int,
                  step: int) -> list[PromptRow]:
    """A seeded rollout batch with ``helpfulness_ratio`` of helpfulness prompts."""
    rng = random.Random(f"{seed}:ppo-batch:{step}")
    n_help = round(config.rollout_batch * config.helpfulness_ratio) if helpful else 0
    n_red = config.rollout_batch - n_help
    return [rng.choice(prompts) for _ in range(n_red)] + [rng.choice(helpful) for _ in range(n_help)]
