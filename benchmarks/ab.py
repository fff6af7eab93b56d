"""Two ember checkouts side by side, in one run: offline throughput and served throughput at fixed
concurrency, rounds interleaved (A B A B ...) so drift on a shared machine hits both alike.

    .venv/bin/python benchmarks/ab.py --a /path/to/old-checkout --b . --rounds 3

Each checkout runs with this virtual environment's Python and its own tree first on PYTHONPATH. Offline:
`ember bench offline` (the default model, float32, chat prompts in one batch, EOS ignored). Served:
`ember serve --quantization q4_1` with `ember bench serve` (this checkout's client for both) on the
`random` workload, 256 prompt tokens and 128 generated, at concurrency 1 and 16 (8 and 32 requests), the same seeded
prompts for both. Prints medians per metric and the ratio B/A; writes every run to --out.
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


def _env(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree)}


def _ember(tree: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], env=_env(tree), check=True, **kw)


def offline(tree: Path, prompts: int, tokens: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "offline.json"
        _ember(
            tree,
            "bench",
            "offline",
            "--hf-prompts",
            "0",
            "--num-prompts",
            str(prompts),
            "--max-tokens",
            str(tokens),
            "--out",
            str(out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return json.loads(out.read_text())["ember"][0]["tokens_per_s"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(tree: Path, runs: list[tuple[int, int]], seed: int, output_len: int) -> dict[int, float]:
    """Output tok/s per concurrency, from one server started from `tree`."""
    port = _port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ember.cli",
            "serve",
            "--port",
            str(port),
            "--quantization",
            "q4_1",
            "--embedding-model",
            "none",
            "--log-level",
            "warning",
        ],
        env=_env(tree),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the server from {tree} did not get ready")
        got = {}
        for concurrency, requests in runs:
            with tempfile.TemporaryDirectory() as tmp:
                _ember(
                    HERE,
                    "bench",
                    "serve",
                    "--base-url",
                    url,
                    "--max-concurrency",
                    str(concurrency),
                    "--num-requests",
                    str(requests),
                    "--input-len",
                    "256",
                    "--output-len",
                    str(output_len),
                    "--ignore-eos",
                    "--seed",
                    str(seed),
                    "--out",
                    tmp,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                result = json.loads((Path(tmp) / "results.json").read_text())["runs"][0]
                got[concurrency] = result["metrics"]["output_throughput"]
        return got
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="the baseline checkout")
    ap.add_argument("--b", type=Path, default=HERE, help="the checkout compared (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=64, help="offline: prompts in the batch")
    ap.add_argument("--tokens", type=int, default=128, help="offline: new tokens per prompt")
    ap.add_argument("--served", default="1:8,16:32", help="CONCURRENCY:REQUESTS pairs, comma-separated")
    ap.add_argument("--output-len", type=int, default=128, help="served: tokens generated per request")
    ap.add_argument("--out", type=Path, default=Path("ab-results.json"))
    args = ap.parse_args()
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    runs: dict[str, dict[str, list[float]]] = {k: {} for k in trees}
    served_runs = [tuple(int(x) for x in pair.split(":")) for pair in args.served.split(",")]
    for r in range(args.rounds):
        for name, tree in trees.items():
            t0 = time.monotonic()
            metrics = {"offline tok/s": offline(tree, args.prompts, args.tokens)}
            for c, tps in served(tree, served_runs, r, args.output_len).items():
                metrics[f"served c={c} tok/s"] = tps
            for k, v in metrics.items():
                runs[name].setdefault(k, []).append(v)
            print(
                f"round {r + 1} {name}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items())
                + f" ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
    print(f"\n| metric | A ({trees['A']}) | B ({trees['B']}) | B / A |")
    print("| --- | ---: | ---: | ---: |")
    for k in runs["A"]:
        a, b = statistics.median(runs["A"][k]), statistics.median(runs["B"][k])
        print(f"| {k} (median of {args.rounds}) | {a:.1f} | {b:.1f} | {b / a:.3f} |")
    args.out.write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
