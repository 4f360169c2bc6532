"""Soft Bradley-Terry loss, preference accuracy and calibration error against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from cai.losses.bradley_terry import (
    expected_calibration_error,
    preference_accuracy,
    soft_bradley_terry_loss,
)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- soft_bradley_terry_loss -------------------------------------------------------------------


def test_loss_by_hand():
    # d = [1, 0]; pair 0 is a hard label for A: -log sigma(1) = log(1 + e^-1);
    # pair 1 has d = 0 and p = 0.5: -(0.5 log 0.5 + 0.5 log 0.5) = log 2.
    loss = soft_bradley_terry_loss(t([1.0, 0.0]), t([0.0, 0.0]), t([1.0, 0.5]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2)


def test_loss_matches_a_plain_python_loop():
    r_a, r_b, p = [0.3, -1.2, 2.5, 0.0], [1.1, 0.4, -0.5, 0.0], [0.8, 0.1, 0.65, 0.3]
    expected = 0.0
    for a, b, pa in zip(r_a, r_b, p):
        d = a - b
        expected += -(pa * log_sigmoid(d) + (1 - pa) * log_sigmoid(-d))
    expected /= len(p)
    assert soft_bradley_terry_loss(t(r_a), t(r_b), t(p)).item() == pytest.approx(expected)


def test_hard_labels_are_the_usual_logistic_loss():
    r_a, r_b = t([0.5, -2.0, 3.0]), t([0.0, 1.0, 3.5])
    p = t([1.0, 0.0, 1.0])
    expected = -(log_sigmoid(0.5) + log_sigmoid(3.0) + log_sigmoid(-0.5)) / 3
    assert soft_bradley_terry_loss(r_a, r_b, p).item() == pytest.approx(expected)


def test_extreme_margins_stay_finite_in_float32():
    r_a = torch.tensor([1000.0, -1000.0, 1000.0])
    r_b = torch.zeros(3)
    p = torch.tensor([1.0, 1.0, 0.3])
    # Per pair: ~0, 1000 (all of -log sigma(-1000)), 0.7 * 1000 from the wrong-side share.
    loss = soft_bradley_terry_loss(r_a, r_b, p)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx((0.0 + 1000.0 + 700.0) / 3, rel=1e-6)


def test_weights_give_a_weighted_mean():
    r_a, r_b, p = t([1.0, 0.0, -1.0]), t([0.0, 0.0, 0.0]), t([1.0, 0.5, 1.0])
    per_pair = [-log_sigmoid(1.0), math.log(2), -log_sigmoid(-1.0)]
    w = [2.0, 0.0, 1.0]
    expected = (2.0 * per_pair[0] + 1.0 * per_pair[2]) / 3.0
    assert soft_bradley_terry_loss(r_a, r_b, p, weights=t(w)).item() == pytest.approx(expected)
    ones = soft_bradley_terry_loss(r_a, r_b, p, weights=torch.ones(3, dtype=torch.float64))
    assert ones.item() == pytest.approx(sum(per_pair) / 3)


def test_gradient_pushes_the_preferred_side_up():
    r_a = torch.tensor([0.0, 0.0], requires_grad=True)
    r_b = torch.tensor([0.0, 0.0], requires_grad=True)
    soft_bradley_terry_loss(r_a, r_b, torch.tensor([0.8, 0.2])).backward()
    # Gradient descent moves against the gradient: p > 0.5 must raise r_a and lower r_b.
    assert r_a.grad[0] < 0 < r_b.grad[0]
    assert r_a.grad[1] > 0 > r_b.grad[1]
    # d loss / d r_a = (sigma(d) - p) / B = (0.5 - 0.8) / 2 at d = 0.
    assert r_a.grad[0].item() == pytest.approx(-0.15)


def test_soft_label_optimum_is_at_the_label_log_odds():
    p = 0.8
    r_a = torch.tensor([math.log(p / (1 - p))], dtype=torch.float64, requires_grad=True)
    soft_bradley_terry_loss(r_a, torch.zeros(1, dtype=torch.float64), t([p])).backward()
    assert r_a.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_loss_rejects_bad_shapes_and_weights():
    with pytest.raises(ValueError, match="same shape"):
        soft_bradley_terry_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="weights"):
        soft_bradley_terry_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), weights=torch.zeros(2))


# --- preference_accuracy -----------------------------------------------------------------------


def test_accuracy_by_hand_leaves_out_even_labels():
    r_a = t([1.0, 0.0, 2.0, 5.0, -1.0])
    r_b = t([0.0, 1.0, 3.0, 0.0, 0.0])
    p = t([0.9, 0.3, 0.7, 0.5, 1.0])
    # right, right, wrong, (left out: p = 0.5), wrong -> 2 of 4.
    assert preference_accuracy(r_a, r_b, p) == pytest.approx(0.5)


def test_accuracy_ties_in_reward_earn_half_a_point():
    assert preference_accuracy(t([1.0, 2.0]), t([1.0, 0.0]), t([0.9, 0.9])) == pytest.approx(0.75)


def test_accuracy_is_nan_when_every_label_is_even():
    assert math.isnan(preference_accuracy(t([1.0, 2.0]), t([0.0, 0.0]), t([0.5, 0.5])))


# --- expected_calibration_error ----------------------------------------------------------------


def test_ece_by_hand_with_two_bins():
    ece, rows = expected_calibration_error(t([0.1, 0.4, 0.6, 0.9]), t([0.0, 1.0, 1.0, 0.5]), n_bins=2)
    # Bin [0, .5): predicted .25, target .5; bin [.5, 1]: .75 vs .75. ECE = 2/4 * .25.
    assert ece == pytest.approx(0.125)
    assert [r["count"] for r in rows] == [2, 2]
    assert rows[0]["bin_low"] == 0.0 and rows[0]["bin_high"] == 0.5 and rows[1]["bin_high"] == 1.0
    assert rows[0]["mean_predicted"] == pytest.approx(0.25) and rows[0]["mean_target"] == pytest.approx(0.5)
    assert rows[1]["mean_predicted"] == pytest.approx(0.75) and rows[1]["mean_target"] == pytest.approx(0.75)


def test_ece_matches_a_plain_python_loop():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(50, generator=gen, dtype=torch.float64).tolist()
    target = torch.rand(50, generator=gen, dtype=torch.float64).tolist()
    n_bins = 5
    bins: list[list[tuple[float, float]]] = [[] for _ in range(n_bins)]
    for p, y in zip(pred, target):
        bins[min(int(p * n_bins), n_bins - 1)].append((p, y))
    expected = 0.0
    for b in bins:
        if b:
            gap = sum(p for p, _ in b) / len(b) - sum(y for _, y in b) / len(b)
            expected += len(b) / len(pred) * abs(gap)
    ece, rows = expected_calibration_error(t(pred), t(target), n_bins=n_bins)
    assert ece == pytest.approx(expected)
    assert [r["count"] for r in rows] == [len(b) for b in bins]


def test_ece_edges_empty_bins_and_perfect_calibration():
    ece, rows = expected_calibration_error(t([0.0, 0.5, 1.0]), t([0.0, 0.5, 1.0]), n_bins=4)
    assert ece == pytest.approx(0.0)
    # 0 -> first bin, 0.5 -> bin [.5, .75), 1.0 -> last bin; bin [.25, .5) is empty.
    assert [r["count"] for r in rows] == [1, 0, 1, 1]
    assert rows[1]["mean_predicted"] is None and rows[1]["mean_target"] is None
    ece, rows = expected_calibration_error(t([]), t([]), n_bins=3)
    assert math.isnan(ece) and len(rows) == 3


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(t([0.5]), t([1.0]), n_bins=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(t([1.5]), t([1.0]))
    with pytest.raises(ValueError, match="same shape"):
        expected_calibration_error(t([0.5, 0.2]), t([1.0]))
