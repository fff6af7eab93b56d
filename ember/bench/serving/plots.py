"""PNG plots of serving results. Each takes labelled results, so one call can put several servers
(or several concurrency levels) on the same axes; a compare script passes its own labels. Each figure is
titled with what was measured and when (workload, endpoint, date), and every panel has its legend, so a
plot read on its own says what it shows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Figure without pyplot: no GUI backend, no global state, safe in threads and on headless machines.
from matplotlib.figure import Figure

from ember.bench.serving.metrics import latencies
from ember.bench.serving.runner import BenchResult

CDF_PANELS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E latency"))


def run_title(results: Sequence[BenchResult]) -> str:
    """'<kind> workload, <n> requests, <endpoint>; <date> UTC' of the first run (a sweep shares them)."""
    if not results:
        return ""
    first = results[0]
    workload = first.config.workload
    date = first.started_at[:16].replace("T", " ")  # ISO 8601 to the minute
    return f"{workload.kind} workload, {len(first.records)} requests, {first.config.endpoint}; {date} UTC"


def plot_latency_cdfs(series: Sequence[tuple[str, BenchResult]], path: Path) -> Path:
    """Empirical CDFs of per-request TTFT, TPOT and E2EL (ms), one line per (label, result)."""
    return _save(latency_cdf_figure(series), path)


def latency_cdf_figure(series: Sequence[tuple[str, BenchResult]]) -> Figure:
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    fig.suptitle(f"latency CDFs: {run_title([r for _, r in series])}")
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
        if ax.get_lines():
            ax.legend(loc="lower right", fontsize="small")
    return fig


def plot_throughput_vs_concurrency(series: Sequence[tuple[str, Sequence[BenchResult]]], path: Path) -> Path:
    """Output tokens/s against the concurrency cap, one line per (label, sweep), a single level too.
    Uncapped runs have no x value and are left out."""
    return _save(throughput_figure(series), path)


def throughput_figure(series: Sequence[tuple[str, Sequence[BenchResult]]]) -> Figure:
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
    runs = [r for _, results in series for r in results]
    ax.set_title(f"output throughput vs concurrency\n{run_title(runs)}", fontsize="medium")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize="small")
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
