"""Intervals for the figures cai reports: a Wilson interval for a proportion, a bootstrap for a mean.

Plain Python on lists of floats, no torch, so training, evaluation and the report can all import it.
"""

from __future__ import annotations

import math
import random
from typing import Sequence


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) for ``successes`` out of ``n`` trials.

    Fractional successes are allowed (a tie counted as half a success). With ``n == 0`` both
    bounds are NaN.
    """
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))]


def bootstrap_mean_interval(values: Sequence[float], n: int, seed: int) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` from ``n`` resamples.

    Seeded, so the same values give the same interval. With no values or ``n < 1`` both bounds
    are NaN.
    """
    values = list(values)
    if not values or n < 1:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    means = [sum(rng.choices(values, k=len(values))) / len(values) for _ in range(n)]
    return (_percentile(means, 0.025), _percentile(means, 0.975))
