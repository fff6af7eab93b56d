"""`ember bench serve`: load an OpenAI-compatible server and measure it as `vllm bench serve` does.

From a script (one process can drive several servers in turn):

    from ember.bench.serving import BenchConfig, WorkloadConfig, run_benchmark, run_sweep

    cfg = BenchConfig(base_url="http://127.0.0.1:8000", model="smollm2-135m-instruct",
                      workload=WorkloadConfig(kind="random", num_requests=200, seed=0),
                      max_concurrency=16, ignore_eos=True)
    result = run_benchmark(cfg)              # BenchResult: .records per request, .metrics
    sweep = run_sweep(cfg, [1, 4, 16])       # one BenchResult per level
    save_results(sweep, Path("out"))         # results.json, workload files, PNGs

Modules: config (the two dataclasses), prompts (exact-length text from a tokenizer), workloads (the
shapes and JSONL), client (one streamed, timed request), runner (arrivals, concurrency, sessions),
metrics (vLLM's definitions), report (table and files), plots (CDFs, throughput vs concurrency).
"""

from ember.bench.serving.client import RequestRecord
from ember.bench.serving.config import BenchConfig, WorkloadConfig, parse_concurrency, parse_goodput
from ember.bench.serving.metrics import Metrics, Stats, compute_metrics
from ember.bench.serving.plots import plot_latency_cdfs, plot_throughput_vs_concurrency
from ember.bench.serving.report import load_results, metrics_table, print_report, save_results
from ember.bench.serving.runner import BenchError, BenchResult, run_benchmark, run_sweep
from ember.bench.serving.workloads import Request, build_workload, load_workload, save_workload

__all__ = [
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "Metrics",
    "Request",
    "RequestRecord",
    "Stats",
    "WorkloadConfig",
    "build_workload",
    "compute_metrics",
    "load_results",
    "load_workload",
    "metrics_table",
    "parse_concurrency",
    "parse_goodput",
    "plot_latency_cdfs",
    "plot_throughput_vs_concurrency",
    "print_report",
    "run_benchmark",
    "run_sweep",
    "save_results",
    "save_workload",
]
