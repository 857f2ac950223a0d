"""Statistics the library reports, in one home: Wilson intervals of success rates, means over seeds
with their Student t intervals, rank correlations (diagnostics, guard and audit), the exchange rate
of practice episodes against demonstrations, and how every report writes a number (:func:`fmt`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties averaged."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: NaN pairs dropped, ties averaged; NaN when fewer than 3 pairs or a side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sane at 0% and 100%)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """t_{0.975} with ``df`` degrees of freedom (table to 30, then a close approximation)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    return _T975[df - 1] if df <= 30 else 1.96 + 2.4 / df


def seed_interval(values: list[float]) -> dict[str, Any]:
    """Mean over seeds and its 95% t-interval (clipped to [0, 1]; None with fewer than two seeds)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95_t": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci95_t": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95_t": [max(0.0, mean - half), min(1.0, mean + half)]}


def demos_equivalent(curve: list[tuple[float, float]], success: float) -> float | None:
    """How many demonstrations SFT needs to reach ``success``, read off an SFT scaling curve.

    ``curve`` holds (demos, success) points. More demos are never counted as worse (the curve's
    running maximum), the curve starts at (0, 0) and is linear between points; ``None`` when no
    point reaches ``success`` (no number of demos in the curve buys it)."""
    best: list[tuple[float, float]] = [(0.0, 0.0)]
    for demos, rate in sorted(curve):
        best.append((float(demos), max(float(rate), best[-1][1])))
    for (d0, s0), (d1, s1) in zip(best, best[1:]):
        if s1 >= success:
            return d1 if s1 == s0 else d0 + (success - s0) / (s1 - s0) * (d1 - d0)
    return None


def exchange_rate(curve: list[tuple[float, float]], demos: float, practice_episodes: float,
                  success: float) -> float | None:
    """Demonstrations one practice episode is worth: a policy trained on ``demos`` that reaches
    ``success`` after ``practice_episodes`` of practice matches SFT on :func:`demos_equivalent`
    demos, so each practice episode stood in for ``(that - demos) / practice_episodes`` of them
    (negative when practice lowered success). ``None`` beyond the curve's best point."""
    if practice_episodes <= 0:
        raise ValueError("practice_episodes must be > 0")
    equivalent = demos_equivalent(curve, success)
    return None if equivalent is None else (equivalent - demos) / practice_episodes


def fmt(x: Any, digits: int = 3) -> str:
    """A number as every report writes it: ``digits`` decimals for floats, ``n/a`` for a missing or NaN value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)
