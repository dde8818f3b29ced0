"""From per-image results to the numbers a report prints: pure functions, numbers in, numbers out.

Every rate and mean comes with a percentile-bootstrap interval (``sdd.stats.bootstrap_ci``, seeded) whose
resampling unit is the **prompt**, not the image: the images of one prompt share it (and consecutive seeds), so
they are not independent draws, and resampling images would give intervals that are too narrow when a suite has
many images per prompt (I2P: 10, the nudity protocol: 100). The bootstrap resamples the per-prompt means; with
the same number of images for every prompt (always the case here) their mean is the overall value, which is
reported as it is (``k / n`` for a rate).

A summary is a plain dict, JSON-ready::

    {"kind": "rate", "value": 0.25, "lo": 0.0, "hi": 0.5, "n": 4, "k": 1, "prompts": 2, "confidence": 0.95,
     "n_resamples": 1000, "seed": 0}

``kind`` is ``rate`` (a fraction of images, printed as %), ``mean`` (a per-image score) or ``value`` (one number
for the whole set, e.g. FID, no interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import numpy as np

from sdd.stats import bootstrap_ci


@dataclass(frozen=True)
class Bootstrap:
    n_resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95


def cluster_means(values: Sequence[float], clusters: Sequence[Hashable]) -> np.ndarray:
    """Mean of ``values`` within each cluster (here: the images of one prompt), clusters in sorted order."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(clusters) != x.size:
        raise ValueError(f"{x.size} values but {len(clusters)} cluster ids")
    groups: dict[Hashable, list[float]] = {}
    for value, cluster in zip(x, clusters):
        groups.setdefault(cluster, []).append(float(value))
    return np.array([np.mean(groups[c]) for c in sorted(groups)], dtype=np.float64)


def summarize(values: Sequence[float], clusters: Sequence[Hashable], kind: str, boot: Bootstrap) -> dict:
    """Value and interval of a rate (``values`` are 0/1 flags) or a mean, bootstrapped over clusters."""
    if kind not in ("rate", "mean"):
        raise ValueError(f"kind must be 'rate' or 'mean', got {kind!r}")
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    out: dict = {"kind": kind}
    if x.size == 0:
        out.update(value=math.nan, lo=math.nan, hi=math.nan, n=0, prompts=0)
    else:
        interval = bootstrap_ci(cluster_means(x, clusters), n_resamples=boot.n_resamples, seed=boot.seed,
                                confidence=boot.confidence)
        out.update(value=float(x.mean()), lo=interval.lo, hi=interval.hi, n=int(x.size), prompts=interval.n)
    if kind == "rate":
        out["k"] = int(x.sum())
    out.update(confidence=boot.confidence, n_resamples=boot.n_resamples, seed=boot.seed)
    return out


def by_category(
    values: Sequence[float],
    clusters: Sequence[Hashable],
    categories: Sequence[Sequence[str]],
    kind: str,
    boot: Bootstrap,
    order: Optional[Sequence[str]] = None,
) -> dict[str, dict]:
    """``summarize`` over the images whose prompt carries each category (a prompt may carry several).

    Categories come in ``order`` if given (those absent from the data get an empty summary), else sorted.
    """
    present = sorted({c for cats in categories for c in cats})
    names = list(order) if order is not None else present
    out = {}
    for name in names:
        idx = [i for i, cats in enumerate(categories) if name in cats]
        out[name] = summarize([values[i] for i in idx], [clusters[i] for i in idx], kind, boot)
    return out


def fixed_value(value: Optional[float], n: int, **extra) -> dict:
    """A one-number metric (FID): no interval."""
    v = math.nan if value is None else float(value)
    return {"kind": "value", "value": v, "lo": math.nan, "hi": math.nan, "n": int(n), **extra}


def from_rate(rate) -> dict:
    """A ``sdd.stats.Rate`` (Wilson interval, what ``sdd-shapes bench`` reports) as a summary."""
    return {"kind": "rate", "value": rate.value, "lo": rate.lo, "hi": rate.hi, "n": rate.n, "k": rate.k,
            "interval": "wilson", "confidence": 0.95}


def format_summary(summary: Optional[dict]) -> str:
    """How a table cell prints: rates in % with their interval, means to 4 decimals, values to 3."""
    if not summary or summary.get("n", 0) == 0 or not math.isfinite(summary.get("value", math.nan)):
        return "n/a"
    v, lo, hi = summary["value"], summary.get("lo", math.nan), summary.get("hi", math.nan)
    if summary["kind"] == "rate":
        return f"{100 * v:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"
    if summary["kind"] == "mean":
        return f"{v:.4f} [{lo:.4f}, {hi:.4f}]"
    return f"{v:.3f}"
