"""Bootstrap confidence intervals, seeded so a report is reproducible.

Percentile bootstrap: resample the items with replacement `n_boot` times, take the statistic of each
resample, and read the interval off the (alpha/2, 1 - alpha/2) quantiles. For two models on the same
items the resampling is paired: an item is drawn with both its scores, so the interval of the difference
is not widened by how much the items differ from each other (the usual case: items vary far more than the
models do).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_BOOT = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic on the items as they are
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    def as_dict(self) -> dict:
        return asdict(self)


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_mean(
    values: list[float], seed: int = 0, n_boot: int = N_BOOT, confidence: float = CONFIDENCE
) -> Interval:
    """The mean of `values` and its percentile-bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values: a confidence interval needs at least one")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # [n_boot]
    return Interval(float(x.mean()), *_percentiles(means, confidence), n=int(x.size), confidence=confidence)


def bootstrap_paired_diff(
    a: list[float], b: list[float], seed: int = 0, n_boot: int = N_BOOT, confidence: float = CONFIDENCE
) -> Interval:
    """mean(b) - mean(a) over paired items (a[i] and b[i] score the same item) and its interval."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired scores differ in number: {x.size} and {y.size}")
    return bootstrap_mean((y - x).tolist(), seed=seed, n_boot=n_boot, confidence=confidence)
