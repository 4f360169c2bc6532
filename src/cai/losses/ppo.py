"""PPO maths for RL-CAI: per-token rewards with a KL penalty, GAE, clipped policy and value losses.

Notation (every [B, T] tensor is aligned with the response tokens, right-padded):

    B, T, V     batch size, response length, vocabulary size
    mask        [B, T], 1 at real response tokens and 0 at padding (bool, int or float)
    logprobs    [B, T] log pi(token) under the policy being trained
    old_logprobs[B, T] the same under the policy that sampled the rollout
    ref_logprobs[B, T] the same under the frozen reference (the SL-CAI model)
    values      [B, T] critic estimates V(s_t); returns R_t and advantages A_t likewise
    score       [B] preference-model score of each whole response
    beta        KL coefficient

Padding may hold anything (even nan or inf): masked functions select with ``torch.where`` rather
than multiplying by the mask, so garbage at padding never leaks into a result or a gradient.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` where ``mask`` (broadcastable to ``x``) is set, over ``dim`` or everything.

    ``nan`` where the mask selects nothing.
    """
    keep = mask.bool()
    total = torch.where(keep, x, 0)
    count = keep.expand_as(x).to(x.dtype)
    if dim is None:
        return total.sum() / count.sum()
    return total.sum(dim) / count.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of ``x`` (a scalar).

    ``unbiased`` divides by n - 1 instead of n (Bessel's correction), as ``torch.var`` does; like
    ``torch.var`` it then gives ``nan`` for a single entry.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().expand_as(x).sum().to(x.dtype)
        var = var * n / (n - 1)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise the masked entries of ``x`` to zero mean and unit variance; padding becomes 0.

    Uses the population variance (divide by n), so the result has exactly unit variance over the
    masked entries and a single entry whitens to 0 instead of nan. With ``shift_mean=False`` the
    original mean is added back (only the scale changes), as is usual for rewards.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=False)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def _last_real_index(mask: Tensor) -> Tensor:
    """[B] index of the last set entry of each row of a [B, T] mask."""
    keep = mask.bool()
    if not bool(keep.any(dim=1).all()):
        empty = (~keep.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} have no response tokens; drop empty responses before scoring")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(keep)
    return torch.where(keep, positions, -1).amax(dim=1)


def per_token_rewards(score: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards: ``-beta * kl_t`` at every real token, plus ``score`` at the last one.

    The preference model judges whole responses, so its score arrives when the response ends;
    the KL penalty is paid token by token and keeps the policy near the reference model.

    Args: score [B]; kl [B, T] per-token KL estimate (see ``kl_penalty``); mask [B, T]; beta.
    Returns: [B, T] rewards, 0 at padding.
    Raises: ValueError when a row has no real token to carry its score.
    """
    keep = mask.bool()
    rewards = torch.where(keep, -beta * kl, torch.zeros_like(kl))
    at_end = F.one_hot(_last_real_index(mask), num_classes=kl.shape[1]).to(rewards.dtype)
    return rewards + at_end * score.to(rewards.dtype).unsqueeze(1)


def kl_penalty(
    logprobs: Tensor, ref_logprobs: Tensor, kind: Literal["k1", "k2", "k3", "abs"] = "k1"
) -> Tensor:
    """Per-token estimate of KL(policy || ref) at tokens sampled from the policy.

    With ``diff = logprobs - ref_logprobs``:

        k1  = diff                              unbiased, but single samples can be negative
        k2  = 0.5 * diff ** 2                   biased (low bias near ref), always >= 0
        k3  = exp(-diff) - 1 + diff             unbiased and always >= 0 (lower variance than k1)
        abs = |diff|                            biased, always >= 0

    "Unbiased": the mean over tokens drawn from the policy equals the true KL (Schulman's note
    "Approximating KL divergence"). Returns [B, T]; raises ValueError for an unknown ``kind``.
    """
    diff = logprobs - ref_logprobs
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff**2
    if kind == "k3":
        return torch.expm1(-diff) + diff
    if kind == "abs":
        return diff.abs()
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of 'k1', 'k2', 'k3', 'abs'")


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    Going backwards from the end, with ``V_{t+1} = 0`` after each row's last real token:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t

    Args: rewards, values [B, T] at the rollout; mask [B, T] with real tokens first in each row
    (right padding); gamma, the discount; lam, 0 for one-step TD up to 1 for Monte Carlo returns.
    Returns: ``(advantages, returns)``, both [B, T], detached, 0 at padding.
    """
    keep = mask.bool()
    r = torch.where(keep, rewards, 0.0)
    v = torch.where(keep, values, 0.0)
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])
    next_advantage = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_advantage
        # At padding, zero the carry so the row's last real token bootstraps from 0.
        a_t = torch.where(keep[:, t], a_t, 0.0)
        advantages[:, t] = a_t
        next_value, next_advantage = v[:, t], a_t
    returns = torch.where(keep, advantages + v, 0.0)
    return advantages, returns


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate loss.

    With ``ratio = exp(logprobs - old_logprobs)`` and ``eps = clip_range``, per token:

        loss_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps))

    averaged over real tokens. Taking the max (the pessimistic side) removes the incentive to move
    the ratio past the clip range; there the gradient is zero.

    Args: logprobs [B, T] with gradient; old_logprobs, advantages [B, T] (constants); mask; eps.
    Returns: ``(loss, clip_fraction, approx_kl)``: scalar loss; share of real tokens where the clipped
    term was strictly larger (so it was used); masked mean of ``0.5 * (logprobs - old_logprobs)^2``.
    The two statistics are detached scalar tensors.
    """
    keep = mask.bool()
    # Zero padding before any arithmetic: nan there would otherwise leak into the gradient.
    log_ratio = torch.where(keep, logprobs - old_logprobs.detach(), 0.0)
    ratio = torch.exp(log_ratio)
    adv = torch.where(keep, advantages.detach(), 0.0)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).to(ratio.dtype), mask).detach()
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, Tensor]:
    """Clipped value loss: the critic may move at most ``c = clip_range_value`` from its rollout value.

    Per token: ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``, masked mean.

    Returns ``(loss, clip_fraction)``: the scalar loss and the share of real tokens where the
    clipped error was strictly larger (detached).
    """
    keep = mask.bool()
    values = torch.where(keep, values, 0.0)
    old = torch.where(keep, old_values.detach(), 0.0)
    target = torch.where(keep, returns.detach(), 0.0)
    v_clipped = old + torch.clamp(values - old, -clip_range_value, clip_range_value)
    unclipped_sq = (values - target) ** 2
    clipped_sq = (v_clipped - target) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), mask)
    clip_fraction = masked_mean((clipped_sq > unclipped_sq).to(values.dtype), mask).detach()
    return loss, clip_fraction


def entropy_from_logits(logits: Tensor) -> Tensor:
    """[B, T, V] logits -> [B, T] entropy ``-sum_v p_v log p_v`` in float32.

    Tokens with probability 0 (logit -inf, e.g. a masked vocabulary) contribute 0, not nan.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return -plogp.sum(dim=-1)


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """[B, T, V] logits and [B, T] token ids -> [B, T] ``log softmax(logits)[token]`` in float32.

    The softmax runs in float32 even for bf16 logits: bf16 keeps ~3 significant digits, too few
    for the small log-ratio differences PPO works with.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over real tokens: 1 is a perfect critic, 0 no better than a constant.

    ``nan`` when the returns do not vary.
    """
    var_returns = masked_var(returns.double(), mask, unbiased=False)
    var_error = masked_var(returns.double() - values.double(), mask, unbiased=False)
    if float(var_returns) == 0.0:
        return math.nan
    return float(1.0 - var_error / var_returns)


class FixedKLController:
    """A KL coefficient that never changes; ``update`` is a no-op, kept so loops need no branch."""

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Do nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards ``target`` (Ziegler et al. 2019).

    Each update: ``error = clip(current_kl / target - 1, -0.2, 0.2)`` and
    ``value *= 1 + error * n_steps / horizon``. Too much KL raises the penalty, too little lowers it;
    the clip bounds the change so one noisy batch can't swing it.
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive; got target={target}, horizon={horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust the coefficient after ``n_steps`` samples whose mean KL was ``current_kl``."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        # Only the coefficient is state; target and horizon come from the config.
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and standard deviation of every scalar seen so far, updated one batch at a time.

    Batches are merged with the parallel form of Welford's algorithm (Chan et al.), in float64, so
    the result equals ``torch.mean`` / ``torch.std`` over the concatenation of all batches. ``std`` is
    the unbiased one; before any data ``mean`` is 0 and ``std`` 1, so normalising is the identity,
    and ``std`` stays 1 until two values have been seen.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.std = 1.0
        self.count = 0
        self._m2 = 0.0  # sum of squared deviations from the mean

    def update(self, x: Tensor) -> tuple[float, float]:
        """Fold in a batch of scalars (any shape); return the batch's own mean and unbiased std."""
        flat = x.detach().double().flatten()
        n = flat.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        batch_mean = float(flat.mean())
        batch_m2 = float(((flat - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self._m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total
        if total > 1:
            self.std = math.sqrt(self._m2 / (total - 1))
        batch_std = math.sqrt(batch_m2 / (n - 1)) if n > 1 else math.nan
        return batch_mean, batch_std

    def state_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "count": self.count, "m2": self._m2}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.mean = float(state["mean"])
        self.std = float(state["std"])
        self.count = int(state["count"])
        self._m2 = float(state["m2"])
