"""Gateway overhead: an upstream `ember serve` called directly vs through a second `ember serve` that
serves it as a --provider, the same load on both, rounds alternated A B A B.

    .venv/bin/python benchmarks/gateway_overhead.py [--upstream model|fake] [--concurrency 16]
        [--requests 96] [--rounds 3] [--max-tokens 8] [--stream]

The upstream serves the default model with few tokens per answer (`model`), or is ember's HTTP layer over
the tests' fake engine (`fake`: tests/gateway/upstream.py, answers at once), so that the gateway's own
cost per request shows as plainly as it can. The gateway is started as a user would (`ember serve --provider up=URL,kind=ember`); it
loads a model of its own too, which stays idle. Each round sends `--requests` completions at
`--concurrency`, to the upstream (A) and then through the gateway (B). Prints requests/s and latency
percentiles per round and pooled: the throughput ratio B/A and the p50 latency B adds; and the CPU time
each server's processes spent per request, which a machine shared with other work does not distort as
it does wall-clock rates. Raw numbers go to
benchmarks/results/gateway-overhead-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ember.models.catalog import DEFAULT_MODEL

TOPICS = ["rivers", "mountains", "the moon", "bread", "trains", "owls", "glass", "winter", "maps", "bees"]
RESULTS = Path(__file__).parent / "results"  # gateway-overhead-{model,fake}-c{concurrency}.json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(extra: list[str], fake: bool = False) -> tuple[subprocess.Popen, str]:
    port = free_port()
    ember = shutil.which("ember") or str(Path(sys.executable).parent / "ember")
    cmd = [ember, "serve", "--port", str(port), "--embedding-model", "none", "--no-store"]
    cmd += ["--log-level", "warning", "--kv-cache-memory", "256MiB", *extra]
    if fake:
        cmd = [sys.executable, "-m", "tests.gateway.upstream", str(port), "up", "0"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"{url} was not ready in 300 s")


async def one(http: httpx.AsyncClient, model: str, i: int, tag: str, args) -> float:
    """Seconds for one completion, to its last byte. `tag` opens the prompt: no side reuses the other's
    prefix-cache entries."""
    body = {
        "model": model,
        "prompt": f"[{tag}] Write about {TOPICS[i % len(TOPICS)]}, part {i}:",
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # every answer the same length, through the gateway too (kind=ember)
        "stream": args.stream,
    }
    started = time.perf_counter()
    async with http.stream("POST", "/v1/completions", json=body) as response:
        async for _ in response.aiter_raw():
            pass
        if response.status_code != 200:
            raise RuntimeError(f"{model}: {response.status_code} {await response.aread()!r}")
    return time.perf_counter() - started


def cpu_seconds(root: int) -> float:
    """CPU time (user + system) the process `root` and its descendants (the engine core) have used."""
    parent, used = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid = int(stat.parent.name)
        parent[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, grew = {root}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(used.get(p, 0.0) for p in tree)


async def round_of(url: str, model: str, tag: str, args, pids: dict[str, int]) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        warm = (one(http, model, -1 - i, tag, args) for i in range(args.concurrency))
        await asyncio.gather(*warm)
        queue = iter(range(args.requests))
        latencies: list[float] = []

        async def worker() -> None:
            for i in queue:
                latencies.append(await one(http, model, i, tag, args))

        cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
        cpu_ms = {n: (cpu_seconds(pid) - cpu[n]) * 1000 / args.requests for n, pid in pids.items()}
    return {
        "rps": args.requests / elapsed,
        "p50": statistics.median(latencies),
        "cpu_ms_per_request": cpu_ms,  # by process tree: upstream, gateway
        "latencies": latencies,
    }


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", choices=("model", "fake"), default="model")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=96, help="per round and side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--stream", action="store_true", help="streamed completions (passed through)")
    args = ap.parse_args()
    load_before = os.getloadavg()
    fake = args.upstream == "fake"
    model = "fake" if fake else DEFAULT_MODEL
    upstream, up_url = start([], fake)
    gateway = None
    try:
        gateway, gw_url = start(["--provider", f"up={up_url}/v1,kind=ember"])
        rounds = []
        for r in range(args.rounds):
            pids = {"upstream": upstream.pid, "gateway": gateway.pid}
            a = asyncio.run(round_of(up_url, model, f"direct {r}", args, pids))
            b = asyncio.run(round_of(gw_url, f"up/{model}", f"gateway {r}", args, pids))
            rounds.append({"direct": a, "gateway": b})
            print(
                f"round {r + 1}: direct {a['rps']:.2f} req/s p50 {a['p50'] * 1000:.1f} ms | gateway "
                f"{b['rps']:.2f} req/s p50 {b['p50'] * 1000:.1f} ms | ratio {b['rps'] / a['rps']:.3f} | "
                f"CPU ms/request: upstream {a['cpu_ms_per_request']['upstream']:.1f} direct, "
                f"{b['cpu_ms_per_request']['upstream']:.1f} via the gateway; gateway "
                f"{b['cpu_ms_per_request']['gateway']:.2f}"
            )
    finally:
        for proc in (gateway, upstream):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    direct = [x for r in rounds for x in r["direct"]["latencies"]]
    through = [x for r in rounds for x in r["gateway"]["latencies"]]
    ratio = sum(r["gateway"]["rps"] for r in rounds) / sum(r["direct"]["rps"] for r in rounds)
    added = (statistics.median(through) - statistics.median(direct)) * 1000
    # What the gateway costs in CPU, next to what the upstream costs: on a machine whose CPUs are the
    # bottleneck, the throughput it leaves is upstream / (upstream + gateway), whatever else is running.
    upstream_cpu = statistics.median(r["direct"]["cpu_ms_per_request"]["upstream"] for r in rounds)
    gateway_cpu = statistics.median(r["gateway"]["cpu_ms_per_request"]["gateway"] for r in rounds)
    summary = {
        "cpu": cpu_name(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "upstream": model,
        "args": vars(args),
        "throughput_ratio": ratio,
        "p50_added_ms": added,
        "upstream_cpu_ms_per_request": upstream_cpu,
        "gateway_cpu_ms_per_request": gateway_cpu,
        "cpu_bound_throughput_ratio": upstream_cpu / (upstream_cpu + gateway_cpu),
        "direct_p50_ms": statistics.median(direct) * 1000,
        "gateway_p50_ms": statistics.median(through) * 1000,
        "direct_p90_ms": pct(direct, 0.9) * 1000,
        "gateway_p90_ms": pct(through, 0.9) * 1000,
        "rounds": [
            {side: {k: v for k, v in r[side].items() if k != "latencies"} for side in r} for r in rounds
        ],
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=1))
    stream = "-stream" if args.stream else ""
    out = RESULTS / f"gateway-overhead-{args.upstream}-c{args.concurrency}{stream}.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
