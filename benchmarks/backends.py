"""What the backend seam costs on the hot path: custom-op dispatch per call, and a whole decode step.

    python benchmarks/backends.py --base /work/base --rounds 5

1. Micro: one RMSNorm row [1, 576] through ember's C kernel called directly, through the backend's bound
   function (what the model calls), and through the registered custom op `torch.ops.ember.rms_norm`.
2. Decode step: the default model, one sequence at ~256 tokens of context, float32 and q4_1, timed in a
   fresh process per (tree, config, round), the two trees interleaved; medians per step and the ratio.
Prints a markdown table (the numbers in benchmarks/BACKENDS.md come from it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREE = HERE.parent
sys.path.insert(0, str(TREE))  # the micro-benchmark imports this tree's ember


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def micro(calls: int = 20000, rounds: int = 7) -> dict[str, float]:
    """us per call, median over rounds."""
    import torch

    from ember.backends import CPU
    from ember.kernels import cpu as kernels

    x, w = torch.randn(1, 576), torch.randn(576)
    ways = {
        "C kernel, direct": lambda: kernels.rms_norm(x, w, 1e-5),
        "backend's bound function": lambda: CPU.rms_norm(x, w, 1e-5),
        "torch.ops.ember.rms_norm": lambda: torch.ops.ember.rms_norm(x, w, 1e-5),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(rounds):
        for name, fn in ways.items():  # interleaved
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def worker(quantization: str | None, context: int, steps: int, warmup: int) -> None:
    """Prefill `context` tokens, then time `steps` single-sequence decode steps; prints JSON (ms)."""
    from ember import LLM

    llm = LLM(model="smollm2-135m-instruct", quantization=quantization, kv_cache_memory="64MiB")
    runner = llm.engine.runner
    tokens = [(7 * i + 11) % 40000 + 100 for i in range(context)]
    table = list(range((context + warmup + steps) // runner.block_size + 1))
    runner.execute([(tokens, 0, context, table)], [0])
    times = []
    for i in range(warmup + steps):
        tokens.append(1000 + i)
        t0 = time.perf_counter()
        runner.execute([(tokens, len(tokens) - 1, 1, table)], [0])
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"median_ms": statistics.median(times[warmup:])}))


def run_worker(tree: Path, quantization: str | None, args) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(HERE / "backends.py"), "--worker", "--quantization", quantization or "none"]
    cmd += ["--context", str(args.context), "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tree).stdout
    return json.loads(out.strip().splitlines()[-1])["median_ms"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, default=Path("/work/base"), help="the tree to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quantization", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(None if args.quantization == "none" else args.quantization, args.context, args.steps, 8)
        return
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores\n")
    print("| call (RMSNorm [1, 576]) | us per call |\n| --- | ---: |")
    for name, us in micro().items():
        print(f"| {name} | {us:.2f} |")
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for quant in (None, "q4_1"):
            for label, tree in (("before", args.base), ("after", TREE)):  # interleaved
                ms = run_worker(tree, quant, args)
                results.setdefault((quant or "float32", label), []).append(ms)
                print(f"round {r} {quant or 'float32'} {label}: {ms:.2f} ms", file=sys.stderr)
    print("\n| decode step, 1 sequence, context 256 | before (main) ms | after ms | after / before |")
    print("| --- | ---: | ---: | ---: |")
    for quant in ("float32", "q4_1"):
        b = statistics.median(results[(quant, "before")])
        a = statistics.median(results[(quant, "after")])
        print(f"| {quant} | {b:.2f} | {a:.2f} | {a / b:.3f} |")
    for quant in ("float32", "q4_1"):
        pairs = zip(results[(quant, "before")], results[(quant, "after")], strict=True)
        print(f"\n{quant} rounds, before/after ms: " + ", ".join(f"{x:.2f}/{y:.2f}" for x, y in pairs))


if __name__ == "__main__":
    main()
