"""The same N chat requests as one batch (/v1/batches) and as N concurrent online requests, on an idle
server, in the same run: wall time of each and their ratio (online / batch: >= 1 means the batch is at
least as fast).

Each round runs both modes, alternating which goes first; every request of a (round, mode) starts with its
own nonce, so neither mode is served from the prefix cache the other one filled. Lines in a mode share a
system prompt after the nonce, as a real batch's lines often do. Between modes the server rests `--gap`
seconds: longer than the scheduler's background grace (`--background-grace-s`, 1 s), during which batch
work right after interactive work still gets only its small share, so each mode starts on an idle server.

    python benchmarks/batch_speed.py --n 64 --max-tokens 32 --rounds 3
    python benchmarks/batch_speed.py --url http://127.0.0.1:8000   # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import openai

MODEL = "smollm2-135m-instruct"
SYSTEM = "You are a helpful assistant that answers questions about numbers briefly and precisely. "


def bodies(n: int, max_tokens: int, nonce: str, system_repeat: int = 1) -> list[dict]:
    return [
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": f"[{nonce}] " + SYSTEM * system_repeat},
                {"role": "user", "content": f"Tell me something about the number {i}."},
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,  # every request makes exactly max_tokens tokens in both modes
        }
        for i in range(n)
    ]


async def online(url: str, reqs: list[dict]) -> tuple[float, int]:
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=1024)) as c:
        start = time.perf_counter()
        answers = await asyncio.gather(*(c.post("/v1/chat/completions", json=r) for r in reqs))
        wall = time.perf_counter() - start
    for a in answers:
        a.raise_for_status()
    return wall, sum(a.json()["usage"]["completion_tokens"] for a in answers)


def batch(client: openai.OpenAI, reqs: list[dict], poll_s: float) -> tuple[float, int]:
    lines = [
        {"custom_id": f"r-{i}", "method": "POST", "url": "/v1/chat/completions", "body": r}
        for i, r in enumerate(reqs)
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    f = client.files.create(file=("bench.jsonl", io.BytesIO(data)), purpose="batch")
    start = time.perf_counter()
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(poll_s)  # a retrieve costs the server ~1.6 ms: polling at 0.1 s takes ~2% of a core
        b = client.batches.retrieve(b.id)
    wall = time.perf_counter() - start
    if b.status != "completed" or b.request_counts.completed != len(reqs):
        raise RuntimeError(f"batch {b.id} ended {b.status}: {b.request_counts}")
    return wall, b.usage.output_tokens


@contextlib.contextmanager
def served(url: str | None, extra: list[str]):
    if url is not None:
        yield url
        return
    with tempfile.TemporaryDirectory() as data_dir:
        port = 8000 + os.getpid() % 1000
        cmd = [sys.executable, "-m", "ember.cli", "serve", "--port", str(port), "--data-dir", data_dir]
        cmd += ["--embedding-model", "none", *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/ready", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the server did not get ready")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def cpu_name() -> str:
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="requests per mode")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--system-repeat", type=int, default=1, help="the shared system prompt, this many times")
    ap.add_argument("--poll", type=float, default=0.1, help="seconds between batch status polls")
    ap.add_argument("--gap", type=float, default=1.5, help="idle seconds before each mode (> the grace)")
    ap.add_argument("--url", default=None, help="a running server (default: start `ember serve`)")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `ember serve` argument")
    args = ap.parse_args()
    with served(args.url, args.serve_arg) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "none"))
        # The first full-width round after a start is ~30% slower in either mode (the engine's buffers
        # grow to the batch's shapes): one such round, untimed, first.
        asyncio.run(online(url, bodies(args.n, args.max_tokens, "warm-up", args.system_repeat)))
        times: dict[str, list[float]] = {"online": [], "batch": []}
        for r in range(args.rounds):
            order = ("batch", "online") if r % 2 == 0 else ("online", "batch")
            for mode in order:
                time.sleep(args.gap)
                reqs = bodies(args.n, args.max_tokens, f"round {r} {mode}", args.system_repeat)
                if mode == "batch":
                    wall, tokens = batch(client, reqs, args.poll)
                else:
                    wall, tokens = asyncio.run(online(url, reqs))
                assert tokens == args.n * args.max_tokens, (mode, tokens)
                times[mode].append(wall)
                print(f"round {r} {mode:6s} {wall:7.2f} s  {tokens / wall:7.1f} tok/s", flush=True)
    on, ba = statistics.median(times["online"]), statistics.median(times["batch"])
    print()
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores)")
    print(f"command: python benchmarks/batch_speed.py {' '.join(sys.argv[1:])}")
    print("| mode | median wall (s) | output tok/s |")
    print("| --- | --- | --- |")
    total = args.n * args.max_tokens
    print(f"| {args.n} concurrent online requests | {on:.2f} | {total / on:.1f} |")
    print(f"| one batch of {args.n} lines | {ba:.2f} | {total / ba:.1f} |")
    print(f"ratio online/batch: {on / ba:.2f} (>= 1: the batch is at least as fast)")
    print(
        "per round (s): " + "; ".join(f"{m} " + ", ".join(f"{t:.2f}" for t in ts) for m, ts in times.items())
    )


if __name__ == "__main__":
    main()
