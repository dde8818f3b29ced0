"""Confidence intervals for the rates the benchmarks report."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Rate:
    k: int  # successes
    n: int  # trials
    lo: float  # 95 % interval
    hi: float

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def as_dict(self) -> dict:
        return {"rate": self.value, **asdict(self)}

    def fmt(self, digits: int = 2) -> str:
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def wilson(k: int, n: int, z: float = Z95) -> Rate:
    """Wilson score interval for k successes in n trials (well behaved at 0 % and 100 %)."""
    if n == 0:
        return Rate(0, 0, float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Rate(k, n, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on the sample itself
    lo: float  # percentile interval at `confidence`
    hi: float
    n: int  # sample size
    n_resamples: int
    confidence: float

    def as_dict(self) -> dict:
        return asdict(self)

    def fmt(self, digits: int = 4) -> str:
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """Percentile bootstrap interval of ``statistic`` (Efron & Tibshirani 1993, ch. 13).

    Draw ``n_resamples`` samples of size n with replacement from ``values``, apply ``statistic`` to each, and
    return the (1 - confidence)/2 and (1 + confidence)/2 quantiles of those values (numpy's default linear
    interpolation). Deterministic for a seed: the resamples come from ``numpy.random.default_rng(seed)``, one
    ``integers(0, n, n)`` draw per resample, in order. Use it for means of per-image scores (CLIP score, LPIPS);
    for a rate of k in n, ``wilson`` is exact enough and needs no resampling.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    n = x.size
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, n_resamples, confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    # one resample at a time: a (n_resamples, n) index matrix for 30k images would take gigabytes
    stats = np.array([float(statistic(x[rng.integers(0, n, n)])) for _ in range(n_resamples)])
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(float(statistic(x)), float(lo), float(hi), n, n_resamples, confidence)
