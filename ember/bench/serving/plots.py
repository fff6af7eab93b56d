"""PNG plots of serving results. Each takes labelled results, so one call can put several servers
(or several concurrency levels) on the same axes; a compare script passes its own labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Figure without pyplot: no GUI backend, no global state, safe in threads and on headless machines.
from matplotlib.figure import Figure

from ember.bench.serving.metrics import latencies
from ember.bench.serving.runner import BenchResult

CDF_PANELS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E latency"))


def plot_latency_cdfs(series: Sequence[tuple[str, BenchResult]], path: Path) -> Path:
    """Empirical CDFs of per-request TTFT, TPOT and E2EL (ms), one line per (label, result)."""
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, len(CDF_PANELS))
    for ax, (key, title) in zip(axes, CDF_PANELS, strict=True):
        for label, result in series:
            ms = np.sort(np.asarray(latencies(result.records)[key], dtype=np.float64)) * 1000.0
            if len(ms):
                ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=label)
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_throughput_vs_concurrency(series: Sequence[tuple[str, Sequence[BenchResult]]], path: Path) -> Path:
    """Output tokens/s against the concurrency cap, one line per (label, sweep). Uncapped runs have
    no x value and are left out."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    levels: set[int] = set()
    for label, results in series:
        points = sorted(
            (r.config.max_concurrency, r.metrics.output_throughput)
            for r in results
            if r.config.max_concurrency is not None
        )
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
            levels.update(xs)
    if levels and max(levels) / min(levels) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(levels), [str(c) for c in sorted(levels)])
    ax.set_xlabel("max concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_title("output throughput vs concurrency")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
