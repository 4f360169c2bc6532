"""Preference-model maths: the Bradley-Terry loss on soft AI labels, and the metrics that judge it.

Notation (one row per compared pair of responses A and B to the same prompt):

    B        number of pairs in the batch
    r_a, r_b scalar rewards the preference model gives A and B, shape [B]
    d        r_a - r_b, the reward margin
    p_a      label: probability that A is the better response, in [0, 1]. The feedback model's
             normalised (A)/(B) probabilities give soft labels; 1.0 / 0.0 are hard labels.

Under Bradley-Terry the model's probability that A wins is sigma(d). The loss is the cross-entropy
between that and the label, so soft labels teach the model how sure the feedback model was, not
only which side it chose.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair_shapes(reward_a: Tensor, reward_b: Tensor, p_a: Tensor) -> None:
    if reward_a.ndim != 1 or reward_a.shape != reward_b.shape or reward_a.shape != p_a.shape:
        raise ValueError(
            f"reward_a, reward_b and p_a must be 1-D tensors of the same shape [B]; got "
            f"{tuple(reward_a.shape)}, {tuple(reward_b.shape)} and {tuple(p_a.shape)}"
        )


def soft_bradley_terry_loss(
    reward_a: Tensor, reward_b: Tensor, p_a: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Mean cross-entropy between sigma(r_a - r_b) and the soft label p_a.

    Per pair: ``loss_i = -(p_a * log sigma(d) + (1 - p_a) * log sigma(-d))`` with ``d = r_a - r_b``.
    ``logsigmoid`` keeps it finite for any |d| (a naive ``log(sigmoid(d))`` gives -inf past |d| ~ 100
    in float32). With p_a in {0, 1} this is the usual hard-label ``-log sigma(+-d)``. For a soft label
    the loss is smallest, not zero, at ``d = log(p_a / (1 - p_a))``.

    Args:
        reward_a: [B] rewards of the first responses.
        reward_b: [B] rewards of the second responses.
        p_a: [B] probability that A is better, in [0, 1].
        weights: optional [B] non-negative per-pair weights; the result is then the weighted mean
            ``sum(w_i * loss_i) / sum(w_i)``.

    Returns:
        A scalar tensor (float32 or wider), differentiable with respect to both rewards.

    Raises:
        ValueError: shapes differ or are not 1-D, or the weights are all zero.
    """
    _check_pair_shapes(reward_a, reward_b, p_a)
    dtype = torch.promote_types(reward_a.dtype, torch.float32)
    d = reward_a.to(dtype) - reward_b.to(dtype)
    p = p_a.to(dtype)
    per_pair = -(p * F.logsigmoid(d) + (1.0 - p) * F.logsigmoid(-d))
    if weights is None:
        return per_pair.mean()
    if weights.shape != per_pair.shape:
        raise ValueError(f"weights must have shape {tuple(per_pair.shape)}; got {tuple(weights.shape)}")
    w = weights.to(dtype)
    total = w.sum()
    if total.item() <= 0:
        raise ValueError("weights sum to zero or less; give at least one pair a positive weight")
    return (w * per_pair).sum() / total


def preference_accuracy(reward_a: Tensor, reward_b: Tensor, p_a: Tensor) -> float:
    """Share of pairs where the preference model picks the side the label prefers.

    A pair counts as right when ``sign(r_a - r_b)`` agrees with ``p_a > 0.5``. Pairs labelled exactly
    0.5 have no preferred side and are left out. A reward tie (``r_a == r_b``) earns half a point, the
    expected score of a coin flip, so a model that scores everything alike gets 0.5, not 0.

    Args:
        reward_a, reward_b: [B] rewards.
        p_a: [B] probability that A is better.

    Returns:
        Accuracy in [0, 1]; ``nan`` when every pair is labelled 0.5 (or the batch is empty).
    """
    _check_pair_shapes(reward_a, reward_b, p_a)
    keep = p_a != 0.5
    if not bool(keep.any()):
        return math.nan
    d = (reward_a.double() - reward_b.double())[keep]
    a_better = p_a[keep] > 0.5
    right = torch.where(a_better, d > 0, d < 0).double()
    score = torch.where(d == 0, torch.full_like(right, 0.5), right)
    return float(score.mean())


def expected_calibration_error(
    pred_p: Tensor, target_p: Tensor, n_bins: int = 10
) -> tuple[float, list[dict]]:
    """Expected calibration error of predicted win probabilities against (soft) labels.

    Predictions are put into ``n_bins`` equal-width bins over [0, 1] (bin k holds
    ``k/n <= p < (k+1)/n``; the last bin also holds p = 1). With ``N_k`` items in bin k:

        ECE = sum_k (N_k / N) * |mean(pred in k) - mean(target in k)|

    A soft label counts as its value (a label of 0.7 is a target of 0.7), so hard labels give the
    textbook ECE.

    Args:
        pred_p: [N] predicted probability that A wins, e.g. ``sigmoid(r_a - r_b)``.
        target_p: [N] label probability that A is better.
        n_bins: number of bins, at least 1.

    Returns:
        ``(ece, rows)``: ``rows`` has one dict per bin, in order, with keys ``bin_low``, ``bin_high``,
        ``count``, ``mean_predicted`` and ``mean_target`` (the two means are ``None`` for an empty
        bin), ready for a calibration plot. ``ece`` is ``nan`` when N = 0.

    Raises:
        ValueError: shapes differ, n_bins < 1, or a prediction lies outside [0, 1].
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1; got {n_bins}")
    if pred_p.ndim != 1 or pred_p.shape != target_p.shape:
        raise ValueError(
            f"pred_p and target_p must be 1-D tensors of the same shape [N]; got "
            f"{tuple(pred_p.shape)} and {tuple(target_p.shape)}"
        )
    pred = pred_p.detach().double().cpu()
    target = target_p.detach().double().cpu()
    if pred.numel() and not bool(((pred >= 0) & (pred <= 1)).all()):
        raise ValueError("pred_p must hold probabilities in [0, 1]; apply sigmoid to reward margins first")
    bin_of = torch.clamp((pred * n_bins).floor().long(), max=n_bins - 1)
    n_total = pred.numel()
    ece = 0.0
    rows: list[dict] = []
    for k in range(n_bins):
        in_bin = bin_of == k
        count = int(in_bin.sum())
        row: dict = {"bin_low": k / n_bins, "bin_high": (k + 1) / n_bins, "count": count,
                     "mean_predicted": None, "mean_target": None}
        if count:
            mean_pred = float(pred[in_bin].mean())
            mean_target = float(target[in_bin].mean())
            row["mean_predicted"], row["mean_target"] = mean_pred, mean_target
            ece += count / n_total * abs(mean_pred - mean_target)
        rows.append(row)
    return (ece if n_total else math.nan), rows
