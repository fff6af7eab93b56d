"""What the backend seam costs on the hot path: custom-op dispatch per call, and a whole decode step.

    python benchmarks/backends.py --base /work/base --rounds 5

1. Micro: one RMSNorm row [1, 576] through ember's C kernel called directly, through the backend's bound
   function (what the model calls), and through the registered custom op `torch.ops.ember.rms_norm`.
2. Decode step: the default model, one sequence at 256 tokens of context, float32 and q4_1. Per round
   and config, one process per tree, both loaded at once, their steps alternating one by one; the median
   step per tree and round, then the median over rounds and the ratio.
Prints a markdown table (the numbers in benchmarks/BACKENDS.md come from it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREE = HERE.parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def micro(calls: int = 20000, rounds: int = 7) -> dict[str, float]:
    """us per call, median over rounds."""
    sys.path.insert(0, str(TREE))  # this tree's ember (only here: the workers import theirs by PYTHONPATH)
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


def worker(quantization: str | None, context: int) -> None:
    """Prefill `context` tokens, then on each stdin line run one decode step of the sequence's next token
    (always the same position, so every step does the same work) and print its time in ms."""
    from ember import LLM

    llm = LLM(model="smollm2-135m-instruct", quantization=quantization, kv_cache_memory="64MiB")
    runner = llm.engine.runner
    tokens = [(7 * i + 11) % 40000 + 100 for i in range(context + 1)]
    table = list(range(context // runner.block_size + 1))
    runner.execute([(tokens, 0, context, table)], [0])
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "count":  # Python and C calls of one step: a noise-free measure of overhead
            counts = {"call": 0, "c_call": 0}

            def profile(frame, event, arg, counts=counts):
                if event in counts:
                    counts[event] += 1

            sys.setprofile(profile)
            runner.execute([(tokens, context, 1, table)], [0])
            sys.setprofile(None)
            print(f"{counts['call']} {counts['c_call']}", flush=True)
            continue
        t0 = time.perf_counter()
        runner.execute([(tokens, context, 1, table)], [0])
        print(f"{(time.perf_counter() - t0) * 1e3:.4f}", flush=True)


def paired_steps(trees: dict[str, Path], quantization: str | None, args) -> dict[str, list[float]]:
    """One worker per tree, both loaded at once; their steps alternate one by one (the order flipping
    every pair), so load from other processes on this shared machine falls on both alike."""
    procs = {}
    for label, tree in trees.items():
        env = {**os.environ, "PYTHONPATH": str(tree)}
        cmd = [
            sys.executable,
            str(HERE / "backends.py"),
            "--worker",
            "--quantization",
            quantization or "none",
        ]
        cmd += ["--context", str(args.context)]
        procs[label] = subprocess.Popen(
            cmd, env=env, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
    for p in procs.values():
        while p.stdout.readline().strip() != "ready":
            pass
    times: dict[str, list[float]] = {label: [] for label in procs}
    labels = list(procs)
    if args.count_calls:
        for label, p in procs.items():
            p.stdin.write("step\ncount\n")  # counted after one warm step
            p.stdin.flush()
            p.stdout.readline()
            calls, c_calls = p.stdout.readline().split()
            print(f"{quantization or 'float32'} {label}: {calls} Python calls, {c_calls} C calls per step")
        args.steps = args.warmup = 0
    for i in range(args.warmup + args.steps):
        for label in labels if i % 2 == 0 else labels[::-1]:
            p = procs[label]
            p.stdin.write("step\n")
            p.stdin.flush()
            ms = float(p.stdout.readline())
            if i >= args.warmup:
                times[label].append(ms)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, default=Path("/work/base"), help="the tree to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per tree and round")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--count-calls", action="store_true", help="count calls per step instead of timing")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quantization", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(None if args.quantization == "none" else args.quantization, args.context)
        return
    if args.count_calls:
        for quant in (None, "q4_1"):
            paired_steps({"before": args.base, "after": TREE}, quant, args)
        return
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores\n")
    print("| call (RMSNorm [1, 576]) | us per call |\n| --- | ---: |")
    for name, us in micro().items():
        print(f"| {name} | {us:.2f} |")
    trees = {"before": args.base, "after": TREE}
    medians: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for quant in (None, "q4_1"):
            times = paired_steps(trees, quant, args)
            for label, t in times.items():
                medians.setdefault((quant or "float32", label), []).append(statistics.median(t))
            b, a = (statistics.median(times[k]) for k in ("before", "after"))
            print(f"round {r} {quant or 'float32'}: before {b:.2f} ms, after {a:.2f} ms", file=sys.stderr)
    print(
        f"\n| decode step, 1 sequence, context {args.context} | before (main) ms | after ms | after / before |"
    )
    print("| --- | ---: | ---: | ---: |")
    for quant in ("float32", "q4_1"):
        b = statistics.median(medians[(quant, "before")])
        a = statistics.median(medians[(quant, "after")])
        print(f"| {quant} | {b:.2f} | {a:.2f} | {a / b:.3f} |")
    for quant in ("float32", "q4_1"):
        pairs = zip(medians[(quant, "before")], medians[(quant, "after")], strict=True)
        print(
            f"\n{quant}, per-round medians before/after ms: "
            + ", ".join(f"{x:.2f}/{y:.2f}" for x, y in pairs)
        )


if __name__ == "__main__":
    main()
