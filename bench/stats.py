"""95% intervals for the benchmarks' means (numpy only)."""

from __future__ import annotations

import math

import numpy as np

Z = 1.959964  # two-sided 95% normal quantile


def t_quantile(df: int) -> float:
    """Two-sided 95% quantile of Student's t with df degrees of freedom: tabulated up to 10,
    then a Cornish-Fisher expansion about the normal (within 0.2% of the exact value)."""
    if df < 1:
        return math.inf
    if df <= 10:
        return (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)[df - 1]
    z = Z
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the t interval of the mean of independent values."""
    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return m, -math.inf, math.inf
    half = t_quantile(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return m, m - half, m + half


def wilson_interval(p: float, n: int) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed over n trials (sensible at p = 0 or 1)."""
    if n == 0:
        return 0.0, 1.0
    denom = 1 + Z**2 / n
    centre = (p + Z**2 / (2 * n)) / denom
    half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
