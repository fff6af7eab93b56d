"""Served throughput of one replica through Ray Serve vs plain `ember serve`, the same load on both,
rounds interleaved (plain, ray, plain, ray, ...) so drift on a shared machine hits both alike.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ray_overhead.py --rounds 3 [--concurrency 8 --requests 32]

Each server: the default model, q4_1, no embedding model; the Ray one `--ray --replicas 1` with as many
torch threads as plain serve uses (`--replica-threads`, default: the machine's cores). The load is
`ember bench serve` on its `random` workload (256 prompt tokens, --output-len generated, EOS ignored), the
same seeded prompts for both. Prints output tokens/s per round, the medians and ray / plain (the bar: 0.90).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ember(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(HERE), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, "-m", "ember.cli", *args], env=env, **kw)


def throughput(extra: list[str], args) -> float:
    """Output tokens/s of `ember bench serve` against a server started with `extra` flags."""
    port = _port()
    flags = [
        "--port",
        str(port),
        "--quantization",
        "q4_1",
        "--embedding-model",
        "none",
        "--log-level",
        "warning",
    ]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = _ember("serve", *flags, *extra, **quiet)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the server ({' '.join(extra) or 'plain'}) did not get ready")
        with tempfile.TemporaryDirectory() as tmp:
            bench = ["--base-url", url, "--max-concurrency", str(args.concurrency)]
            bench += ["--num-requests", str(args.requests), "--input-len", "256"]
            bench += ["--output-len", str(args.output_len), "--ignore-eos", "--seed", "0", "--out", tmp]
            if _ember("bench", "serve", *bench, **quiet).wait() != 0:
                raise RuntimeError("ember bench serve failed")
            result = json.loads((Path(tmp) / "results.json").read_text())["runs"][0]
            return result["metrics"]["output_throughput"]
    finally:
        server.terminate()
        server.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--replica-threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    ray = ["--ray", "--replicas", "1", "--replica-threads", str(args.replica_threads)]
    got: dict[str, list[float]] = {"plain": [], "ray": []}
    for r in range(args.rounds):
        for name, extra in (("plain", []), ("ray", ray)):
            got[name].append(throughput(extra, args))
            print(f"round {r + 1} {name}: {got[name][-1]:.1f} output tok/s", flush=True)
    plain, through_ray = statistics.median(got["plain"]), statistics.median(got["ray"])
    print(
        f"median plain {plain:.1f}, ray {through_ray:.1f} tok/s; ray / plain = {through_ray / plain:.2f} (>= 0.90)"
    )


if __name__ == "__main__":
    main()
