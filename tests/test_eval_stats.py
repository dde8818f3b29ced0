"""bootstrap_ci: the percentile interval, deterministic for a seed, on samples whose answer is known."""

import math

import numpy as np
import pytest

from sdd.stats import bootstrap_ci, wilson


def test_two_point_sample_gives_the_exact_resampling_distribution():
    # Resampling [0, 1] twice: the mean is 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4).
    wide = bootstrap_ci([0.0, 1.0], np.mean, n_resamples=4000, seed=0, confidence=0.95)
    assert (wide.value, wide.lo, wide.hi) == (0.5, 0.0, 1.0)
    # The 30 % and 70 % quantiles both fall inside the 0.5 mass (sampling error ~0.007 at 4000 resamples).
    narrow = bootstrap_ci([0.0, 1.0], np.mean, n_resamples=4000, seed=0, confidence=0.4)
    assert (narrow.lo, narrow.hi) == (0.5, 0.5)


def test_follows_the_documented_procedure_exactly():
    values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0])
    rng = np.random.default_rng(7)
    stats = [np.median(values[rng.integers(0, 7, 7)]) for _ in range(200)]
    lo, hi = np.quantile(stats, [0.05, 0.95])
    ci = bootstrap_ci(values, np.median, n_resamples=200, seed=7, confidence=0.9)
    assert (ci.value, ci.lo, ci.hi, ci.n, ci.n_resamples) == (3.0, lo, hi, 7, 200)


def test_deterministic_for_a_seed_and_different_across_seeds():
    values = np.random.default_rng(1).normal(size=50)
    a = bootstrap_ci(values, np.mean, n_resamples=300, seed=3)
    assert a == bootstrap_ci(values, np.mean, n_resamples=300, seed=3)
    assert a != bootstrap_ci(values, np.mean, n_resamples=300, seed=4)


def test_constant_sample_has_a_zero_width_interval_and_empty_is_nan():
    ci = bootstrap_ci([0.27] * 10, np.mean, n_resamples=50, seed=0)
    assert ci.lo == pytest.approx(0.27) and ci.hi == pytest.approx(0.27)
    assert all(math.isnan(v) for v in (lambda c: (c.value, c.lo, c.hi))(bootstrap_ci([], np.mean, 10, 0)))


def test_a_rate_agrees_with_the_wilson_interval():
    # 30 successes in 100: bootstrap of the mean of 0/1 values ~ [0.21, 0.39]; Wilson [0.219, 0.396].
    values = np.r_[np.ones(30), np.zeros(70)]
    ci, w = bootstrap_ci(values, np.mean, n_resamples=2000, seed=0), wilson(30, 100)
    assert ci.value == 0.3
    assert abs(ci.lo - w.lo) < 0.02 and abs(ci.hi - w.hi) < 0.02
