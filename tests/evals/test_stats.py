"""Bootstrap intervals on known cases: a constant, reproducibility by seed, agreement with the normal
approximation on a large sample, and the paired difference being narrower than the unpaired one."""

from __future__ import annotations

import numpy as np
import pytest

from ember.evals.stats import bootstrap_mean, bootstrap_paired_diff


def test_a_constant_has_a_point_interval():
    ci = bootstrap_mean([0.5] * 10)
    assert (ci.estimate, ci.low, ci.high, ci.n) == (0.5, 0.5, 0.5, 10)


def test_the_same_seed_gives_the_same_interval():
    x = [0.1, 0.9, 0.35, 0.0, 0.7, 0.2, 0.55, 1.0]
    assert bootstrap_mean(x, seed=3) == bootstrap_mean(x, seed=3)
    assert bootstrap_mean(x, seed=3) != bootstrap_mean(x, seed=4)


def test_the_interval_of_a_proportion_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    x = (rng.random(400) < 0.3).astype(float)
    ci = bootstrap_mean(x.tolist(), n_boot=4000)
    half = 1.96 * x.std() / np.sqrt(x.size)  # the textbook interval, for a sample this large
    assert ci.estimate == pytest.approx(x.mean())
    assert ci.low == pytest.approx(x.mean() - half, abs=0.01)
    assert ci.high == pytest.approx(x.mean() + half, abs=0.01)


def test_pairing_removes_the_spread_between_items():
    rng = np.random.default_rng(1)
    base = rng.random(50) * 10  # items differ a lot
    a, b = base, base + 0.1  # B is better by 0.1 on every item
    d = bootstrap_paired_diff(a.tolist(), b.tolist())
    assert d.estimate == pytest.approx(0.1) and d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    ia, ib = bootstrap_mean(a.tolist()), bootstrap_mean(b.tolist())
    assert ib.low < ia.high  # unpaired, the two intervals overlap


def test_no_values_or_unpaired_lengths_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="differ in number"):
        bootstrap_paired_diff([1.0], [1.0, 2.0])
