"""Tests for cai.eval.elo: recovering known strengths, bootstrap coverage, anchors and user errors."""

import math

import numpy as np
import pytest

from cai.errors import CaiError
from cai.eval.elo import (
    ELO_PER_NAT,
    Comparison,
    bootstrap_elo,
    elo_from_strengths,
    elo_table,
    fit_bradley_terry,
)

TRUE_THETA = {"base": -1.0, "sl": 0.0, "rl": 0.5, "rl_cot": 1.5}
NAMES = list(TRUE_THETA)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def true_elo() -> dict[str, float]:
    mean = np.mean(list(TRUE_THETA.values()))
    return {m: ELO_PER_NAT * (t - mean) for m, t in TRUE_THETA.items()}


def synthetic(n_prompts: int, seed: int, soft: bool = False) -> list[Comparison]:
    """Each prompt: a random pair judged in both A/B orders, hard Bernoulli wins or exact soft labels."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_prompts):
        a, b = rng.choice(NAMES, size=2, replace=False)
        p = sigmoid(TRUE_THETA[a] - TRUE_THETA[b])
        for first, second, prob in ((a, b, p), (b, a, 1 - p)):
            label = prob if soft else float(rng.random() < prob)
            out.append(Comparison(str(first), str(second), label, prompt_id=f"q{k}"))
    return out


# ---- fitting -----------------------------------------------------------------------------------


def test_two_models_match_hand_computed_log_odds():
    # A wins 3 of 4: the maximum-likelihood gap is ln(3); the 1e-3 prior moves it by < 1e-3.
    comps = [Comparison("a", "b", 1.0)] * 3 + [Comparison("b", "a", 1.0)]
    theta = fit_bradley_terry(comps)
    assert theta["a"] - theta["b"] == pytest.approx(math.log(3), abs=1e-3)
    assert theta["a"] + theta["b"] == pytest.approx(0.0, abs=1e-12)


def test_exact_soft_labels_recover_strengths_almost_exactly():
    # Noise-free soft labels sigmoid(theta_a - theta_b) are the likelihood's own fixed point, so only
    # the tiny prior separates the fit from the truth.
    theta = fit_bradley_terry(synthetic(300, seed=1, soft=True))
    mean = np.mean(list(TRUE_THETA.values()))
    for m, t in TRUE_THETA.items():
        assert theta[m] == pytest.approx(t - mean, abs=5e-3)


def test_bernoulli_wins_recover_strengths_and_order():
    theta = fit_bradley_terry(synthetic(2000, seed=2))  # 4000 judgements, ~670 per pair
    mean = np.mean(list(TRUE_THETA.values()))
    # Each pair's log-odds has standard error ~ 1/sqrt(670 * p(1-p)) <= 0.09, and every strength pools
    # three pairs, so its error is ~0.05; 0.2 is about four standard errors (ignoring the A/B
    # correlation, which the synthetic judge doesn't have).
    for m, t in TRUE_THETA.items():
        assert theta[m] == pytest.approx(t - mean, abs=0.2)
    assert sorted(theta, key=theta.get) == sorted(TRUE_THETA, key=TRUE_THETA.get)
    assert sum(theta.values()) == pytest.approx(0.0, abs=1e-9)


def test_all_ties_give_equal_ratings():
    comps = [Comparison(a, b, 0.5, f"q{i}") for i, (a, b) in enumerate(
        [("x", "y"), ("y", "z"), ("z", "x"), ("x", "y"), ("w", "x")])]
    theta = fit_bradley_terry(comps)
    assert all(abs(t) < 1e-9 for t in theta.values())
    lows_highs = bootstrap_elo(comps, n=20)
    assert all(lo == pytest.approx(0, abs=1e-6) and hi == pytest.approx(0, abs=1e-6) for lo, hi in lows_highs.values())


def test_a_model_that_always_wins_stays_finite_and_on_top():
    comps = [Comparison("champ", "other", 1.0)] * 50 + [Comparison("other", "third", 0.7)] * 20
    theta = fit_bradley_terry(comps)
    assert all(math.isfinite(t) for t in theta.values())
    assert theta["champ"] > theta["other"] + 5  # sigmoid(5) > 0.99: a near-certain win
    assert theta["other"] > theta["third"]


# ---- Elo scale and anchor ----------------------------------------------------------------------


def test_elo_scale_and_anchor():
    theta = {"a": math.log(10) / 2, "b": -math.log(10) / 2}  # 10:1 odds
    elo = elo_from_strengths(theta)
    assert elo["a"] - elo["b"] == pytest.approx(400.0)
    assert elo["a"] + elo["b"] == pytest.approx(0.0)
    anchored = elo_from_strengths(theta, anchor="b", base=1000.0)
    assert anchored == pytest.approx({"a": 1400.0, "b": 1000.0})


def test_bootstrap_intervals_cover_true_elo():
    comps = synthetic(600, seed=3)
    elo = elo_from_strengths(fit_bradley_terry(comps))
    intervals = bootstrap_elo(comps, n=200, seed=0, ci=0.95)
    # Seeds are fixed: across 40 fresh data sets, 95% intervals missed some model's true Elo in 5
    # (about the 1 - 0.95**3 one expects for 4 centred ratings), so a failure here means a real change.
    for m, (lo, hi) in intervals.items():
        assert lo < elo[m] < hi
        assert lo <= true_elo()[m] <= hi
        assert hi - lo < 150  # ~600 judgements per model pin each rating to tens of points


def test_bootstrap_is_reproducible_and_anchor_interval_collapses():
    comps = synthetic(200, seed=4)
    first = bootstrap_elo(comps, n=30, seed=7, anchor="sl")
    assert first == bootstrap_elo(comps, n=30, seed=7, anchor="sl")
    assert first["sl"] == pytest.approx((0.0, 0.0), abs=1e-9)
    assert first["rl_cot"][0] > 0  # clearly better than the anchor


def test_elo_table_rows_sorted_with_counts_and_win_rates():
    comps = synthetic(400, seed=5)
    rows = elo_table(comps, anchor="base", n_bootstrap=50)
    assert [r["model"] for r in rows] == ["rl_cot", "rl", "sl", "base"]
    assert {r["model"]: r["elo"] for r in rows}["base"] == pytest.approx(0.0)
    assert sum(r["comparisons"] for r in rows) == 2 * len(comps)
    for r in rows:
        assert set(r) == {"model", "elo", "ci_low", "ci_high", "comparisons", "win_rate"}
        assert r["ci_low"] <= r["elo"] <= r["ci_high"]
        assert 0.0 <= r["win_rate"] <= 1.0
    assert rows[0]["win_rate"] > 0.5 > rows[-1]["win_rate"]
    no_ci = elo_table(comps, n_bootstrap=0)
    assert all(math.isnan(r["ci_low"]) and math.isnan(r["ci_high"]) for r in no_ci)


# ---- errors a user sees ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "comps, words",
    [
        ([], "No comparisons"),
        ([Comparison("a", "a", 1.0)], "against itself"),
        ([Comparison("a", "b", 1.5)], "p_a=1.5"),
        ([Comparison("a", "b", -0.1)], "p_a=-0.1"),
        ([Comparison("a", "b", float("nan"))], "p_a=nan"),
    ],
)
def test_bad_comparisons_raise_cai_error(comps, words):
    with pytest.raises(CaiError, match=words):
        fit_bradley_terry(comps)
    with pytest.raises(CaiError, match=words):
        bootstrap_elo(comps, n=5)


def test_bad_arguments_raise_cai_error():
    comps = [Comparison("a", "b", 1.0), Comparison("b", "a", 0.2)]
    with pytest.raises(CaiError, match="Anchor model 'zzz'"):
        elo_from_strengths(fit_bradley_terry(comps), anchor="zzz")
    with pytest.raises(CaiError, match="Anchor model 'zzz'"):
        bootstrap_elo(comps, anchor="zzz")
    with pytest.raises(CaiError, match="ci="):
        bootstrap_elo(comps, ci=1.0)
    with pytest.raises(CaiError, match="n=0"):
        bootstrap_elo(comps, n=0)
    with pytest.raises(CaiError, match="l2="):
        fit_bradley_terry(comps, l2=0.0)
