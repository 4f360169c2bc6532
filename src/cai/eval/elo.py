"""Elo ratings of models from pairwise judgements, as in the CAI paper's harmlessness/helpfulness plots.

A judge (a human, or a feedback model reading "(A)"/"(B)" log-probs) compares two models' answers
to one prompt and gives `p_a`, its probability that A's answer is better. We fit a Bradley-Terry
model to those judgements,

    P(A beats B) = sigmoid(theta_A - theta_B),

treating each judgement as `p_a` of a win for A and `1 - p_a` of a win for B (soft labels; hard
wins are 1/0, a tie 0.5). Log-strengths `theta` map to Elo by

    elo = 400 / ln(10) * theta        so a 400-point gap means 10:1 odds (P = 10/11 ~ 0.91),

the chess convention the paper uses. Only differences are meaningful: ratings are centred at 0,
or shifted so one anchor model (say the initial helpful RLHF model) sits at a chosen base.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cai.errors import CaiError

ELO_PER_NAT = 400.0 / math.log(10.0)  # Elo points per unit of log-strength (~173.7)

# Defaults of the Bradley-Terry fit, shared by the plain fit and every bootstrap refit.
L2 = 1e-3  # weight of the Gaussian prior on log-strengths: tiny, only keeps unbeaten models finite
MAX_ITER = 500  # most Newton steps per fit (a few dozen are typical)
TOL = 1e-9  # a fit has converged when no log-strength moves by more than this in one step
BOOTSTRAP_RESAMPLES = 200  # resamples behind each Elo interval; fewer give unstable bounds


@dataclass(frozen=True)
class Comparison:
    """One judgement of model A's answer against model B's.

    Args:
        model_a, model_b: names of the two models (must differ).
        p_a: the judge's probability, in [0, 1], that A's answer is better.
        prompt_id: the prompt both answers respond to; judgements sharing it are resampled together.
    """

    model_a: str
    model_b: str
    p_a: float
    prompt_id: str = ""


def _index(comparisons: Sequence[Comparison]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Check the judgements and turn them into (models, index of A, index of B, p_a) arrays."""
    if len(comparisons) == 0:
        raise CaiError("No comparisons were given; Elo ratings need at least one pairwise judgement.")
    models: dict[str, int] = {}
    ia, ib, p = [], [], []
    for k, c in enumerate(comparisons):
        if c.model_a == c.model_b:
            raise CaiError(f"Comparison {k} pits model {c.model_a!r} against itself; compare two different models.")
        p_a = float(c.p_a)
        if not 0.0 <= p_a <= 1.0:  # also false for NaN
            raise CaiError(f"Comparison {k} has p_a={c.p_a!r}; it must be a probability between 0 and 1.")
        ia.append(models.setdefault(c.model_a, len(models)))
        ib.append(models.setdefault(c.model_b, len(models)))
        p.append(p_a)
    return list(models), np.array(ia), np.array(ib), np.array(p)


def _fit(n: int, ia: np.ndarray, ib: np.ndarray, p: np.ndarray, w: np.ndarray,
         l2: float, max_iter: int, tol: float) -> np.ndarray:
    """Newton's method on the L2-penalised soft Bradley-Terry log-likelihood.

    Shapes: ia, ib, p, w are (m,) for m judgements (w counts how often each is used, for the
    bootstrap); returns theta of shape (n,), mean 0.

    The judgements collapse into an (n, n) matrix `wins[i, j]` (fractional wins of i over j), so
    each step costs O(n^2 + n^3) however many judgements there are. The objective is concave and,
    with l2 > 0, strictly so; a backtracking line search keeps Newton steps from overshooting when a
    model wins (nearly) every time and its strength runs off towards the prior's limit.
    """
    wins = np.zeros((n, n))
    np.add.at(wins, (ia, ib), w * p)
    np.add.at(wins, (ib, ia), w * (1.0 - p))
    games = wins + wins.T  # symmetric: how many (weighted) judgements each pair had

    def objective(theta: np.ndarray) -> float:
        diff = theta[:, None] - theta[None, :]
        return float(-(wins * np.logaddexp(0.0, -diff)).sum() - 0.5 * l2 * theta @ theta)

    theta = np.zeros(n)
    value = objective(theta)
    for _ in range(max_iter):
        prob = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # P(i beats j)
        grad = (wins - games * prob).sum(axis=1) - l2 * theta
        curv = games * prob * (1.0 - prob)
        hess = np.diag(curv.sum(axis=1)) - curv + l2 * np.eye(n)  # minus the Hessian; positive definite
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            candidate = theta + t * step
            new_value = objective(candidate)
            if new_value >= value - 1e-12 * abs(value) or t < 1e-8:
                break
            t *= 0.5
        theta, value = candidate, new_value
        if np.max(np.abs(t * step)) < tol:
            break
    return theta - theta.mean()


def fit_bradley_terry(comparisons: Sequence[Comparison], *, l2: float = L2, max_iter: int = MAX_ITER,
                      tol: float = TOL) -> dict[str, float]:
    """Maximum-likelihood log-strengths from soft pairwise judgements.

    Args:
        comparisons: judgements; each counts as `p_a` of a win for A and `1 - p_a` for B.
        l2: weight of a Gaussian prior `l2/2 * ||theta||^2`, tiny, so that a model that always wins
            (or loses) gets a large but finite strength, and models never linked to the others sit at 0.
        max_iter: most Newton steps (a few dozen are typical).
        tol: stop when no strength moves by more than this in one step.

    Returns:
        {model: theta}, centred to mean 0, in order of first appearance; P(A beats B) = sigmoid(theta_A - theta_B).

    Raises:
        CaiError: no comparisons, a model compared with itself, or p_a outside [0, 1].
    """
    if l2 <= 0:
        raise CaiError(f"l2={l2!r} must be positive, or a model that always wins would get infinite strength.")
    models, ia, ib, p = _index(comparisons)
    theta = _fit(len(models), ia, ib, p, np.ones_like(p), l2, max_iter, tol)
    return {m: float(t) for m, t in zip(models, theta)}


def elo_from_strengths(theta: dict[str, float], *, anchor: str | None = None, base: float = 0.0) -> dict[str, float]:
    """Convert log-strengths to Elo points: `elo = 400 / ln(10) * theta`, then shift.

    On this scale a 400-point gap means 10:1 odds (P(win) ~ 0.91), 200 points ~ 3.2:1 (P ~ 0.76).

    Args:
        theta: {model: log-strength}, as from `fit_bradley_terry`.
        anchor: a model to place at `base` (e.g. the starting helpful model); None centres the mean at `base`.
        base: the Elo the anchor (or the mean) sits at.

    Raises:
        CaiError: the anchor is not one of the rated models.
    """
    if anchor is not None and anchor not in theta:
        raise CaiError(f"Anchor model {anchor!r} is not among the rated models {sorted(theta)}; pick one of them.")
    elo = {m: ELO_PER_NAT * t for m, t in theta.items()}
    shift = elo[anchor] if anchor is not None else (sum(elo.values()) / len(elo) if elo else 0.0)
    return {m: e - shift + base for m, e in elo.items()}


def _groups(comparisons: Sequence[Comparison]) -> np.ndarray:
    """Group id per judgement: judgements with the same non-empty prompt_id share one; others stand alone."""
    ids: dict[str, int] = {}
    out = np.empty(len(comparisons), dtype=int)
    for k, c in enumerate(comparisons):
        key = f"p:{c.prompt_id}" if c.prompt_id else f"c:{k}"
        out[k] = ids.setdefault(key, len(ids))
    return out


def bootstrap_elo(comparisons: Sequence[Comparison], *, n: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                  ci: float = 0.95, anchor: str | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for each model's Elo.

    Judgements are resampled with replacement by prompt (all judgements sharing a non-empty
    `prompt_id` move together, since both A/B orders of one prompt are correlated), or one by one
    where no prompt id is given, and the ratings are refit each time. A resample in which some
    model does not appear cannot rate it and is dropped.

    Args:
        comparisons: judgements, as for `fit_bradley_terry`.
        n: number of resamples.
        seed: seed of the resampling, so intervals are reproducible.
        ci: coverage of the interval, in (0, 1).
        anchor: as in `elo_from_strengths`; the anchor's own interval is then (base, base).

    Returns:
        {model: (low, high)} in Elo points.

    Raises:
        CaiError: bad arguments or comparisons, or no resample contained every model.
    """
    if n < 1:
        raise CaiError(f"n={n!r} bootstrap resamples is too few; use at least 1 ({BOOTSTRAP_RESAMPLES} or more for stable "
                       "intervals).")
    if not 0.0 < ci < 1.0:
        raise CaiError(f"ci={ci!r} must be a coverage strictly between 0 and 1, such as 0.95.")
    models, ia, ib, p = _index(comparisons)
    if anchor is not None and anchor not in models:
        raise CaiError(f"Anchor model {anchor!r} is not among the rated models {sorted(models)}; pick one of them.")
    group = _groups(comparisons)
    n_groups = int(group.max()) + 1
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        picks = np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups)
        w = picks[group].astype(float)  # how often each judgement appears in this resample
        present = np.zeros(len(models), dtype=bool)
        present[ia[w > 0]] = present[ib[w > 0]] = True
        if not present.all():
            continue
        theta = _fit(len(models), ia, ib, p, w, L2, MAX_ITER, TOL)
        elo = elo_from_strengths(dict(zip(models, theta)), anchor=anchor)
        draws.append([elo[m] for m in models])
    if not draws:
        raise CaiError("Every bootstrap resample left out some model; collect more comparisons per model.")
    low, high = np.percentile(np.array(draws), [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    return {m: (float(lo), float(hi)) for m, lo, hi in zip(models, low, high)}


def elo_table(comparisons: Sequence[Comparison], *, anchor: str | None = None,
              n_bootstrap: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[dict]:
    """One row per model, best first: `{"model", "elo", "ci_low", "ci_high", "comparisons", "win_rate"}`.

    `comparisons` counts the judgements a model took part in; `win_rate` is its share of
    (fractional) wins among them. With `n_bootstrap=0` the interval bounds are NaN.
    """
    elo = elo_from_strengths(fit_bradley_terry(comparisons), anchor=anchor)
    intervals = (bootstrap_elo(comparisons, n=n_bootstrap, seed=seed, anchor=anchor) if n_bootstrap > 0
                 else {m: (math.nan, math.nan) for m in elo})
    count = dict.fromkeys(elo, 0)
    wins = dict.fromkeys(elo, 0.0)
    for c in comparisons:
        count[c.model_a] += 1
        count[c.model_b] += 1
        wins[c.model_a] += c.p_a
        wins[c.model_b] += 1.0 - c.p_a
    rows = [{"model": m, "elo": e, "ci_low": intervals[m][0], "ci_high": intervals[m][1],
             "comparisons": count[m], "win_rate": wins[m] / count[m]} for m, e in elo.items()]
    return sorted(rows, key=lambda r: r["elo"], reverse=True)
