"""What a run leaves behind: a table on the terminal, results.json, the workload files and the plots."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ember.bench.serving.client import RequestRecord
from ember.bench.serving.config import BenchConfig, WorkloadConfig
from ember.bench.serving.metrics import LATENCIES, Metrics, Stats
from ember.bench.serving.plots import plot_latency_cdfs, plot_throughput_vs_concurrency
from ember.bench.serving.runner import BenchResult
from ember.bench.serving.workloads import save_workload

RESULTS_VERSION = 1
_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}


def run_label(result: BenchResult) -> str:
    c = result.config.max_concurrency
    return f"c={c}" if c is not None else f"rate={result.config.request_rate:g}"


def metrics_table(results: Sequence[BenchResult], labels: Sequence[str] | None = None) -> Table:
    """One column per result (a concurrency level, or a server when a compare script labels them)."""
    labels = list(labels) if labels is not None else [run_label(r) for r in results]
    first = results[0].config
    table = Table(title=f"ember bench serve: {first.model} at {first.base_url} ({first.endpoint})")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    ms = [r.metrics for r in results]

    def row(name: str, values: list) -> None:
        table.add_row(name, *("-" if v is None else v if isinstance(v, str) else f"{v:,.2f}" for v in values))

    row("successful requests", [str(m.completed) for m in ms])
    row("failed requests", [str(m.failed) for m in ms])
    row("duration (s)", [m.duration for m in ms])
    row("total input tokens", [str(m.total_input) for m in ms])
    row("total output tokens", [str(m.total_output) for m in ms])
    if any(m.total_cached for m in ms):
        row("cached prompt tokens", [f"{m.total_cached} ({m.prefix_hit_rate:.0%})" for m in ms])
    row("request throughput (req/s)", [m.request_throughput for m in ms])
    if any(m.goodput is not None for m in ms):
        row("goodput (req/s)", [m.goodput for m in ms])
    row("output throughput (tok/s)", [m.output_throughput for m in ms])
    row("total token throughput (tok/s)", [m.total_token_throughput for m in ms])
    for key in LATENCIES:
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat} {_NAMES[key]} (ms)", [getattr(getattr(m, key), stat) for m in ms])
    return table


def print_report(results: Sequence[BenchResult], console: Console | None = None) -> None:
    console = console or Console()
    console.print(metrics_table(results))
    for result in results:
        failed = [r for r in result.records if not r.success]
        for r in failed[:5]:
            console.print(f"[red]{run_label(result)} {r.id} failed:[/red] {r.error}")
        if len(failed) > 5:
            console.print(f"[red]... and {len(failed) - 5} more failures (all in results.json)[/red]")
        if result.metrics.usage_fallbacks:
            console.print(
                f"[yellow]{run_label(result)}: {result.metrics.usage_fallbacks} requests came back without "
                "usage; their output tokens are counted from chunks[/yellow]"
            )


def save_results(results: Sequence[BenchResult], out: Path) -> list[Path]:
    """Write results.json, one workload file per run (replayable with --workload file) and the plots;
    returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    runs = []
    names: set[str] = set()
    for i, result in enumerate(results):
        name = _workload_name(result, i, len(results), names)
        names.add(name)
        save_workload(result.requests, out / name)
        written.append(out / name)
        runs.append(result_to_json(result) | {"workload_file": name})
    path = out / "results.json"
    path.write_text(json.dumps({"version": RESULTS_VERSION, "runs": runs}, indent=1))
    written.append(path)
    written.append(plot_latency_cdfs([(run_label(r), r) for r in results], out / "latency_cdf.png"))
    if any(r.config.max_concurrency is not None for r in results):  # one capped run makes a point too
        model = results[0].config.model
        written.append(
            plot_throughput_vs_concurrency([(model, results)], out / "throughput_vs_concurrency.png")
        )
    return written


def _workload_name(result: BenchResult, index: int, runs: int, taken: set[str]) -> str:
    if runs == 1:
        return "workload.jsonl"
    c = result.config.max_concurrency
    name = f"workload-c{c}.jsonl" if c is not None else f"workload-{index}.jsonl"
    return name if name not in taken else f"workload-{index}.jsonl"


def result_to_json(result: BenchResult) -> dict:
    config = dataclasses.asdict(result.config)
    if config["api_key"]:
        config["api_key"] = "(set)"  # never written to disk
    return _plain(
        {
            "config": config,
            "seed": result.seed,
            "server": {"base_url": result.config.base_url, "model": result.config.model},
            "started_at": result.started_at,
            "metrics": dataclasses.asdict(result.metrics),
            "requests": [dataclasses.asdict(r) for r in result.records],
        }
    )


def load_results(path: Path) -> list[BenchResult]:
    """The runs of a results.json, as BenchResults (workloads left empty), for plotting and comparing."""
    data = json.loads(Path(path).read_text())
    results = []
    for run in data["runs"]:
        cfg = dict(run["config"])
        cfg["workload"] = WorkloadConfig(**cfg["workload"])
        cfg["request_rate"] = float(cfg["request_rate"])
        cfg["burstiness"] = float(cfg["burstiness"])
        cfg["api_key"] = None
        m = dict(run["metrics"])
        for key in LATENCIES:
            m[key] = Stats(**m[key])
        records = [RequestRecord(**r) for r in run["requests"]]
        results.append(
            BenchResult(BenchConfig(**cfg), run["seed"], [], records, Metrics(**m), run["started_at"])
        )
    return results


def _plain(value):
    """JSON-safe: paths as text, inf and nan as strings (strict JSON has no such numbers)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
