"""The optimizer against a full grid over the same space, on one machine: how close its pick comes to the
grid's best, and with how many real replays.

    .venv/bin/python benchmarks/optimizer_vs_grid.py [--shape chat] [--objective "..."] [--out DIR]

The grid replays every candidate for real (`ember serve --config`, the workload's arrivals) and takes the
best measured feasible one. The optimizer predicts every candidate (the real scheduler on a simulated
clock, this machine's profile) and replays at most a quarter as many. Both runs keep their state in
--out, so an interrupted benchmark resumes. Writes DIR/optimizer_vs_grid.md; say which CPU it ran on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from ember.config import CacheConfig, EngineConfig
from ember.optimize import predict as pr
from ember.optimize.objective import parse_objective
from ember.optimize.profile import cpu_name
from ember.optimize.replay import replay
from ember.optimize.search import State, search
from ember.optimize.space import Candidate, candidates, held, space

SPACE = {
    "scheduler.max_num_seqs": "1,4,16",
    "scheduler.max_num_batched_tokens": "64,512",
    "cache.enable_prefix_caching": "true,false",
    "speculative.method": "none,ngram",
}
HELD = {"dtype": "float32", "quantization": "none", "speculative.num_speculative_tokens": "4"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="chat", choices=("chat", "rag", "edit"))
    ap.add_argument("--objective", default="ttft_p95<=20s, minimize cost")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--output-len", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("optimizer-vs-grid"))
    args = ap.parse_args()

    from ember.optimize.workload import generate

    base = EngineConfig(cache=CacheConfig(kv_cache_memory="256MiB"))
    work = generate(
        args.shape,
        num_requests=args.num_requests,
        rate=args.rate,
        output_len=args.output_len,
        model=base.model,
    )
    goal = parse_objective(args.objective)
    values = space(fields=(), vary=SPACE, fix=HELD)
    base = held(values, base)
    grid = candidates(values, base)
    finish = lambda m: pr.with_cost(m, pr.PRICES["cpu"])  # noqa: E731
    quality = lambda c: {"quality": 1.0}  # noqa: E731  (every setting here is lossless)

    def measure(c: Candidate, where: str) -> dict:
        return replay(
            c.engine(base),
            work,
            goal.slos_ms,
            args.out / where,
            "c" + hashlib.sha256(c.key.encode()).hexdigest()[:8],
        )

    # The grid: every candidate replayed.
    t0 = time.monotonic()
    gstate = State(args.out / "grid.json", work.key)
    grid_measured = {}
    for i, c in enumerate(grid):
        m = gstate.data["measured"].get(c.key) or gstate.remember("measured", c.key, measure(c, "grid"))
        grid_measured[c.key] = finish({**m, "quality": 1.0})
        print(f"grid {i + 1}/{len(grid)}: {c.label()}", file=sys.stderr)
    grid_s = time.monotonic() - t0
    feasible = [k for k, m in grid_measured.items() if goal.feasible(m)]
    best = min(feasible, key=lambda k: goal.score(grid_measured[k])) if feasible else None

    # The optimizer: predict all, replay a quarter.
    t0 = time.monotonic()
    outputs = pr.greedy_outputs(work, base.model)
    predictor = pr.Predictor(work, base, goal.slos_ms, outputs)
    budget = max(1, len(grid) // 4)
    out = search(
        grid,
        Candidate(()),
        goal,
        predictor,
        quality,
        lambda c: measure(c, "optimizer"),
        finish,
        State(args.out / "optimizer.json", work.key),
        budget,
        calibrate=predictor.calibrate,
    )
    opt_s = time.monotonic() - t0
    by_key = {c.key: c for c in grid}
    lines = [
        f"# Optimizer vs full grid ({args.shape}, {len(work.items)} requests at {args.rate}/s)\n",
        f"CPU: {cpu_name()}. Objective: `{goal}`. Space: {json.dumps(SPACE)}, held {json.dumps(HELD)}.\n",
        "| search | real replays | wall s | pick | measured goal |",
        "| --- | --- | --- | --- | --- |",
    ]
    gv = grid_measured[best][goal.goal] if best else math.nan
    ov = grid_measured[out.pick][goal.goal] if out.pick in grid_measured else math.nan
    lines.append(
        f"| grid | {len(grid)} | {grid_s:.0f} | {by_key[best].label() if best else '-'} | {gv:.4g} |"
    )
    pick = out.by_key[out.pick].label() if out.pick else "-"
    lines.append(
        f"| optimizer | {len(out.measured)} | {opt_s:.0f} | {pick} | {ov:.4g} (grid's replay of it) |"
    )
    if best and out.pick:
        lines.append(
            f"\nOptimizer's pick vs the grid's best, by the grid's own replays: {abs(ov - gv) / gv:+.1%}.\n"
        )
    (args.out / "optimizer_vs_grid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
