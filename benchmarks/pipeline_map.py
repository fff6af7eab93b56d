"""A pipeline's `map` over 32 items against the same 32 chat calls made by a client, one after another and
all at once.

    PYTHONPATH=. .venv/bin/python benchmarks/pipeline_map.py --rounds 3

One `ember serve --pipeline tagger=...` (the default model). The pipeline: a tool step (this file's
`tickets`, a registered Python function) gives 32 support tickets; a `map` asks the model for each one's
category with one shared instruction (a few hundred tokens, the same prefix for every item) before the
ticket. The client modes send the very same 32 chat bodies to /v1/chat/completions:
- sequential: one after another, each waiting for the last;
- concurrent: all 32 at once (32 threads).
Every call decodes greedily with the same `--max-tokens`, so each mode computes the same tokens (the
completion tokens printed per run show it). Rounds alternate the order of the modes (map, sequential, concurrent; then reversed), so drift on
a shared machine hits them alike. Reports the median seconds per mode and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent.parent
ITEMS = 32
INSTRUCTION = (
    "You sort customer support tickets for a company that sells home routers, mesh systems and a "
    "monthly internet plan. Read the ticket and answer with its category, one of: billing (charges, "
    "refunds, invoices, plan prices), setup (unboxing, installing, first connection, the app), "
    "connectivity (slow speeds, drops, no signal, range), hardware (a broken device, lights, power, "
    "returns of faulty units), account (logins, passwords, profile, email changes) or other. "
    "A ticket about being charged after a return is billing, not hardware. A ticket about the app "
    "failing to find a new device is setup. A ticket about the connection dropping every evening is "
    "connectivity. A ticket about a device that will not power on is hardware. When a ticket mentions "
    "two problems, pick the one the customer asks to have solved. Answer with the category first, "
    "then one short sentence that says why."
)
SUBJECTS = ("refund", "router lights", "slow wifi", "password reset", "new mesh node", "invoice", "no signal",
            "app login", "charged twice", "power adapter")  # fmt: skip


def tickets(n: int) -> list[str]:
    """The pipeline's tool step: n short tickets, each different."""
    return [
        f"Ticket {i}: my {SUBJECTS[i % len(SUBJECTS)]} problem started {i + 1} days ago." for i in range(n)
    ]


def spec(model: str, max_tokens: int) -> dict:
    return {
        "description": "the category of each of 32 tickets, one batch",
        "steps": [
            {
                "name": "tickets",
                "kind": "tool",
                "function": "benchmarks.pipeline_map:tickets",
                "arguments": {"n": ITEMS},
            },
            {
                "name": "tagged",
                "kind": "map",
                "over": "tickets",
                "model": model,
                "system": INSTRUCTION,
                "prompt": "{{item}}",
                "max_tokens": max_tokens,
                "timeout_s": 1200,  # a busy machine: the batch may take minutes
            },
        ],
        "output": "tagged",
    }


def bodies(model: str, max_tokens: int) -> list[dict]:
    """The map's own 32 requests, as a client would send them."""
    return [
        {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "messages": [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": t}],
        }  # fmt: skip
        for t in tickets(ITEMS)
    ]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def run_map(c: httpx.Client) -> dict:
    r = c.post(
        "/v1/chat/completions", json={"model": "tagger", "messages": [{"role": "user", "content": "go"}]}
    )
    r.raise_for_status()
    trace = r.json()["pipeline"]
    tagged = next(s for s in trace["steps"] if s["step"] == "tagged")
    return {"completion_tokens": tagged["completion_tokens"], "cached_tokens": tagged["cached_tokens"]}


def _one(c: httpx.Client, body: dict) -> dict:
    r = c.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()["usage"]


def _summed(usages: list[dict]) -> dict:
    return {
        "completion_tokens": sum(u["completion_tokens"] for u in usages),
        "cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages),
    }


def run_sequential(c: httpx.Client, calls: list[dict]) -> dict:
    return _summed([_one(c, b) for b in calls])


def run_concurrent(c: httpx.Client, calls: list[dict]) -> dict:
    with ThreadPoolExecutor(len(calls)) as pool:
        return _summed(list(pool.map(lambda b: _one(c, b), calls)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each mode (orders alternating)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens each item generates")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(HERE / "benchmarks" / "results" / "pipeline-map.json"))
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="ember-pipeline-bench-"))
    pipeline = spec(args.model, args.max_tokens)
    (data / "tagger.yaml").write_text(yaml.safe_dump(pipeline))
    port = _port()
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--model", args.model, "--port", str(port),
           "--embedding-model", "none", "--log-level", "warning", "--data-dir", str(data),
           "--pipeline", f"tagger={data / 'tagger.yaml'}"]  # fmt: skip
    server = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(HERE)}, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    calls = bodies(args.model, args.max_tokens)
    rows: list[dict] = []
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not get ready")
            time.sleep(0.5)
        c = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64))
        run_map(c)  # warm-up: the instruction's blocks are in the prefix cache for every mode alike
        modes = {
            "map": lambda: run_map(c),
            "sequential": lambda: run_sequential(c, calls),
            "concurrent": lambda: run_concurrent(c, calls),
        }
        for r in range(args.rounds):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            for mode in order:
                start = time.perf_counter()
                got = modes[mode]()
                got.update(mode=mode, round=r, seconds=time.perf_counter() - start)
                rows.append(got)
                print(f"round {r}  {mode:10}  {got['seconds']:.2f} s  completion {got['completion_tokens']}  "
                      f"cached {got['cached_tokens']}", flush=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
    med = {
        m: statistics.median(r["seconds"] for r in rows if r["mode"] == m)
        for m in ("map", "sequential", "concurrent")
    }
    summary = {
        "cpu": _cpu(),
        "items": ITEMS,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "median_s": med,
        "sequential_over_map": med["sequential"] / med["map"],
        "concurrent_over_map": med["concurrent"] / med["map"],
    }
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
