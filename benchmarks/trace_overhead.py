"""What trace capture costs: throughput and p99 latency at 16 concurrent streams with capture off and on,
in one run on one server, rounds alternating (off on off on ...) so drift on a shared machine hits both
alike.

    PYTHONPATH=. .venv/bin/python benchmarks/trace_overhead.py --rounds 6

One `ember serve` (the default model, embeddings off, its store in a temporary directory, traces off by
default); an "on" round sends every request with `store: true`, so the same process, cache state and
batch shapes serve both, and the only difference is the capture path (the hook, the stream tee, the
writer's batches, redaction and SQLite commits). Each round: 16 workers, each streaming --per-worker chat
completions of --max-tokens tokens (EOS ignored). Prints per-mode medians and the on/off ratios; writes
every round to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
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


def _p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98]


async def _round(url: str, model: str, store: bool, workers: int, per_worker: int, max_tokens: int, r: int):
    """(seconds the round took, each request's latency in seconds, each request's TTFT in seconds)."""
    lat: list[float] = []
    ttft: list[float] = []

    async def worker(client: httpx.AsyncClient, w: int) -> None:
        for i in range(per_worker):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"Round {r}, worker {w}, story {i}: once upon"}],
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
            }
            if store:
                body.update(store=True, metadata={"bench": "trace_overhead", "round": str(r)})
            start = time.perf_counter()
            first = None
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.perf_counter()
            lat.append(time.perf_counter() - start)
            ttft.append(first - start)

    limits = httpx.Limits(max_connections=workers)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client, w) for w in range(workers)))
        return time.perf_counter() - start, lat, ttft


def micro(n: int = 2000, tokens: int = 64) -> dict:
    """CPU time per trace of the capture path, in-process (no server, no model): the request path (the
    hook's begin and finish, the tee over `tokens` chunks) and the writer (decode, assemble, redact,
    insert and commit in batches). A number the machine's load does not move much."""
    from types import SimpleNamespace

    from ember.protocol.requests import ChatCompletionRequest
    from ember.server.backend import Stream
    from ember.store.db import Store
    from ember.traces import TraceRecorder

    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me a story about a dragon. " * 6}],
            "max_tokens": tokens, "stream": True, "store": True, "metadata": {"bench": "micro"}}  # fmt: skip
    raw = json.dumps(body).encode()
    request = SimpleNamespace(body=lambda: asyncio.sleep(0, raw))
    chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "system_fingerprint": "ember", "choices": [{"index": 0, "delta": {"content": " word"},
             "logprobs": None, "finish_reason": None}], "usage": None}  # fmt: skip

    async def chunks(i: int):
        for _ in range(tokens):
            yield {**chunk, "id": f"chatcmpl-{i}"}
        yield {**chunk, "id": f"chatcmpl-{i}", "choices": [], "usage": {"prompt_tokens": 60,
               "completion_tokens": tokens, "total_tokens": 60 + tokens,
               "prompt_tokens_details": {"cached_tokens": 0}}}  # fmt: skip

    async def go(recorder: TraceRecorder) -> tuple[float, float]:
        path = 0.0
        for i in range(n):
            req = ChatCompletionRequest.model_validate(body)
            t = time.process_time()
            capture = await recorder.begin(req, request, None, "key-a")
            stream = capture.finish(Stream(chunks(i), lambda: None))
            async for _ in stream.chunks:
                pass
            path += time.process_time() - t
        t = time.process_time()
        await recorder.flush()
        return path, time.process_time() - t

    with tempfile.TemporaryDirectory() as tmp:
        recorder = TraceRecorder(Store(f"sqlite:///{tmp}/ember.db"))
        base = asyncio.run(_baseline(n, chunks))
        path, writer = asyncio.run(go(recorder))
    return {"request_path_us": (path - base) / n * 1e6, "writer_us": writer / n * 1e6, "tokens": tokens}


async def _baseline(n: int, chunks) -> float:
    """CPU time of iterating the chunks alone (what the route does without capture)."""
    t = time.process_time()
    for i in range(n):
        async for _ in chunks(i):
            pass
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="rounds per mode (alternating)")
    ap.add_argument("--workers", type=int, default=16, help="concurrent streams")
    ap.add_argument("--per-worker", type=int, default=4, help="requests per worker per round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(HERE / "benchmarks" / "results" / "trace-overhead.json"))
    ap.add_argument("--micro", action="store_true", help="only the in-process CPU cost per trace")
    args = ap.parse_args()
    if args.micro:
        print(json.dumps(micro(), indent=2))
        return

    data = Path(tempfile.mkdtemp(prefix="ember-trace-bench-"))
    port = _port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--model", args.model, "--port", str(port),
           "--embedding-model", "none", "--log-level", "warning", "--data-dir", str(data)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not get ready")
            time.sleep(0.5)
        shape = (args.workers, args.per_worker, args.max_tokens)
        asyncio.run(_round(url, args.model, False, *shape, -1))  # warm-up, not counted
        rounds = []
        for r in range(2 * args.rounds):
            store = r % 2 == 1
            took, lat, ttft = asyncio.run(_round(url, args.model, store, *shape, r))
            tokens = args.workers * args.per_worker * args.max_tokens
            rounds.append({"capture": store, "seconds": took, "tok_per_s": tokens / took, "latency_s": lat,
                           "ttft_s": ttft})  # fmt: skip
            print(f"round {r:2d} capture={'on ' if store else 'off'} {tokens / took:7.1f} tok/s  "
                  f"p99 {_p99(lat):.3f} s", flush=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=60)
    stored = sqlite3.connect(data / "ember.db").execute("SELECT count(*) FROM traces").fetchone()[0]

    summary = {}
    for mode in (False, True):
        mine = [x for x in rounds if x["capture"] is mode]
        summary["on" if mode else "off"] = {
            "tok_per_s_median": statistics.median(x["tok_per_s"] for x in mine),
            "latency_p99_s": _p99([v for x in mine for v in x["latency_s"]]),
            "ttft_p99_s": _p99([v for x in mine for v in x["ttft_s"]]),
        }
    on, off = summary["on"], summary["off"]
    ratios = {
        "throughput_on_over_off": on["tok_per_s_median"] / off["tok_per_s_median"],
        "p99_latency_on_over_off": on["latency_p99_s"] / off["latency_p99_s"],
        "p99_ttft_on_over_off": on["ttft_p99_s"] / off["ttft_p99_s"],
    }
    expected = args.rounds * args.workers * args.per_worker
    print(json.dumps({**summary, **ratios, "traces_stored": stored, "traces_expected": expected}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "args": vars(args),
                "summary": summary,
                "ratios": ratios,
                "traces_stored": stored,
                "rounds": rounds,
            },
            indent=1,
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
