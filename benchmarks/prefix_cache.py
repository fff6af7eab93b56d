"""Prefix caching on vs off, same prompts, one run: what it saves and what it costs.

    .venv/bin/python benchmarks/prefix_cache.py [--concurrency 1,4] [--rounds 3] [--out benchmarks]

Starts two ember servers side by side (`ember serve` as benchmarks/compare.py runs it, and the same with
`--no-prefix-cache`; float32 unless `--ember-flags` says otherwise) and sends each the same requests, alternating which goes first:
- `shared-prefix` (4 groups sharing a 512-token prefix, 64 unique tokens each, 32 generated) and `chat`
  (sessions of 4 turns of 128 tokens, each resending its history, 32 generated) at each concurrency: TTFT
  with and without the cache;
- `random` (256 in, 64 out; nothing repeats: a 0% hit rate) at concurrency 16, `--rounds` times: the
  cost of hashing blocks and looking them up, as the median ratio of output throughput.
Writes `<out>/PREFIX_CACHE.md` and `<out>/results/prefix-cache.json`; `--render-only` redoes the page
from that JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import MODEL, ROOT, WORKLOADS, _cpu_name, server  # noqa: E402

from ember.bench.serving import BenchConfig, BenchResult, WorkloadConfig, run_benchmark  # noqa: E402
from ember.bench.serving.report import result_to_json  # noqa: E402

ENGINES = ("ember", "ember-no-cache")
# Prompts as compare.py sends them; short outputs, since what changes is the prefill.
SHAPES = {
    "shared-prefix": ({**WORKLOADS["shared-prefix"], "output_len": 32}, "completions"),
    "chat": (dict(kind="chat", input_len=128, output_len=32, num_turns=4), "chat"),
    "random": ({**WORKLOADS["random"], "output_len": 64}, "completions"),
}


def run(url: str, workload: str, conc: int, n: int, seed: int) -> BenchResult:
    spec, endpoint = SHAPES[workload]
    wl = WorkloadConfig(**spec, num_requests=n, seed=seed)
    cfg = BenchConfig(
        base_url=url, model=MODEL, workload=wl, endpoint=endpoint, max_concurrency=conc, ignore_eos=True
    )
    return run_benchmark(cfg)


def bookkeeping_us(n: int = 2000, prompt_len: int = 256) -> float:
    """Microseconds of prefix-cache work (hash, look up, admit, name the blocks, free) per prompt of
    `prompt_len` tokens that finds nothing: what a 0% hit rate costs, without the noise of a served run."""
    import random

    from ember.engine.kv_cache import KVCacheManager, root_hash
    from ember.engine.sequence import Request, Sequence
    from ember.sampling_params import SamplingParams

    kv, rng, seqs = KVCacheManager(4096, 16), random.Random(0), []
    for i in range(n):
        tokens = [rng.randrange(100, 40000) for _ in range(prompt_len)]
        request = Request(str(i), None, tokens, SamplingParams(), prompt_len + 1)
        request.cache_root = root_hash(None)
        seqs.append(Sequence(request, 0, list(tokens), None, None))
    t0 = time.perf_counter()
    for seq in seqs:
        hits = kv.lookup(seq)
        kv.admit(seq, hits, prompt_len - len(hits) * kv.block_size)
        seq.num_computed_tokens = prompt_len
        kv.commit(seq)
        kv.free(seq)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--requests", type=int, default=16, help="requests per shared-prefix and chat run")
    ap.add_argument("--rounds", type=int, default=3, help="random-workload rounds per engine")
    ap.add_argument("--random-requests", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    ap.add_argument(
        "--ember-flags",
        default="--kv-cache-memory 1GiB",
        help="`ember serve` flags for both servers (default: float32, the serve default)",
    )
    ap.add_argument("--render-only", action="store_true", help="redo PREFIX_CACHE.md from the JSON")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render_only:
        data = json.loads((out / "results" / "prefix-cache.json").read_text())
        cost = data.get("bookkeeping_us") or bookkeeping_us()
        (out / "PREFIX_CACHE.md").write_text(render(data["runs"], data["descs"], data["seed0"], cost))
        return
    levels = [int(c) for c in args.concurrency.split(",")]
    args.concurrency = [16]  # compare.server reads it (llama.cpp slots); unused for ember
    (out / "results").mkdir(parents=True, exist_ok=True)
    seed0 = int.from_bytes(os.urandom(3), "little")
    runs: list[dict] = []
    with ExitStack() as stack:
        urls, descs = {}, {}
        for e in ENGINES:
            urls[e], descs[e] = stack.enter_context(
                server(e, args, out / "results", args.ember_flags.split())
            )
        plan = [(w, c, 0) for w in ("shared-prefix", "chat") for c in levels]
        plan += [("random", 16, r) for r in range(args.rounds)]
        for i, (workload, conc, rnd) in enumerate(plan):
            n = args.random_requests if workload == "random" else args.requests
            seed = seed0 + 1000 * i
            order = ENGINES if i % 2 == 0 else ENGINES[::-1]
            for e in order:
                print(f"{e}: {workload}, concurrency {conc}, round {rnd}, {n} requests", flush=True)
                r = run(urls[e], workload, conc, n, seed)
                m = r.metrics
                print(
                    f"  {m.output_throughput:.1f} tok/s, TTFT p50 {m.ttft.median:.0f} ms, "
                    f"cached {m.prefix_hit_rate:.0%}, failed {m.failed}",
                    flush=True,
                )
                runs.append(
                    {
                        "engine": e,
                        "workload": workload,
                        "concurrency": conc,
                        "round": rnd,
                        **result_to_json(r),
                    }
                )
    cost = bookkeeping_us()
    (out / "results" / "prefix-cache.json").write_text(
        json.dumps({"seed0": seed0, "descs": descs, "bookkeeping_us": cost, "runs": runs})
    )
    text = render(runs, descs, seed0, cost)
    (out / "PREFIX_CACHE.md").write_text(text)
    print(text)


def render(runs: list[dict], descs: dict[str, str], seed0: int, cost_us: float) -> str:
    def get(e: str, w: str, c: int, rnd: int = 0) -> dict:
        return next(
            r["metrics"]
            for r in runs
            if (r["engine"], r["workload"], r["concurrency"], r["round"]) == (e, w, c, rnd)
        )

    lines = [
        "# Prefix caching on vs off",
        "",
        f"`benchmarks/prefix_cache.py`, {time.strftime('%Y-%m-%d')}, {_cpu_name()} ({os.cpu_count()} cores); "
        "both servers up "
        f"side by side, each run sent to both with the same prompts (seeds from {seed0}), alternating which "
        "goes first. Streamed, temperature 0, EOS ignored; metrics as `vllm bench serve` defines them; "
        "cached tokens from the servers' usage.",
        "",
        "```bash",
        ".venv/bin/python benchmarks/prefix_cache.py",
        "```",
        "",
        *[f"- {e}: {descs[e]}" for e in ENGINES],
        "",
        "| workload | concurrency | prompt tokens cached | TTFT p50 ms on / off | TTFT ratio | "
        "TTFT p99 ms on / off | output tok/s on / off |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    seen = []
    for r in runs:
        key = (r["workload"], r["concurrency"])
        if r["workload"] == "random" or key in seen:
            continue
        seen.append(key)
        on, off = get("ember", *key), get("ember-no-cache", *key)
        hit = on["total_cached"] / on["total_input"] if on["total_input"] else 0.0
        lines.append(
            f"| {key[0]} | {key[1]} | {hit:.0%} | {on['ttft']['median']:.0f} / {off['ttft']['median']:.0f} | "
            f"{off['ttft']['median'] / on['ttft']['median']:.1f}x lower | "
            f"{on['ttft']['p99']:.0f} / {off['ttft']['p99']:.0f} | "
            f"{on['output_throughput']:.1f} / {off['output_throughput']:.1f} |"
        )
    rounds = sorted({r["round"] for r in runs if r["workload"] == "random"})
    if rounds:
        ratios = [
            get("ember", "random", 16, k)["output_throughput"]
            / get("ember-no-cache", "random", 16, k)["output_throughput"]
            for k in rounds
        ]
        each = ", ".join(
            f"{get('ember', 'random', 16, k)['output_throughput']:.1f} / "
            f"{get('ember-no-cache', 'random', 16, k)['output_throughput']:.1f}"
            for k in rounds
        )
        hits = sum(get("ember", "random", 16, k)["total_cached"] for k in rounds)
        lines += [
            "",
            f"At a 0% hit rate (`random`, concurrency 16, {len(rounds)} rounds, {hits} tokens cached): output "
            f"tok/s on / off per round {each}; median ratio on/off **{statistics.median(ratios):.3f}** "
            f"(the cost of hashing and lookups: {(statistics.median(ratios) - 1) * 100:+.1f}% throughput).",
            "",
            f"Measured directly, without a server: the cache's bookkeeping for a 256-token prompt that finds "
            f"nothing (hash its 16 blocks, look them up, admit, name the computed blocks, free) takes "
            f"{cost_us:.0f} us, against hundreds of milliseconds to prefill it; a decode step adds one "
            "integer comparison per sequence, and one block hash every 16 tokens. The spread between rounds "
            "of the served runs is the machine's noise, not the cache.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
