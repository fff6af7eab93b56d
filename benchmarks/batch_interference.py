"""Interactive traffic with a batch running vs with none, in the same run: TTFT p50 and TPOT p50 of 4
streaming chat users, and how fast the batch progresses meanwhile.

Rounds alternate: "idle" (the users alone) and "batch" (the users while a large batch runs: a real
/v1/batches batch, or with --via http as many concurrent requests with `priority: 10`, the batches'
priority). A batch round cancels what is left of its batch at the end and waits for the engine to drain,
so the next idle round is idle.

    python benchmarks/batch_interference.py --rounds 4
    python benchmarks/batch_interference.py --serve-arg=--background-token-budget --serve-arg=8
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time

import httpx
import openai

sys.path.insert(0, os.path.dirname(__file__))
from batch_speed import MODEL, cpu_name, served  # noqa: E402

USERS = 4
QUESTIONS = [
    "Name three rivers in Europe.",
    "What is the capital of Japan?",
    "Give me a short tip for writing clear code.",
    "Why is the sky blue? One sentence.",
]


async def user(client: httpx.AsyncClient, u: int, n: int, max_tokens: int, nonce: str, out: list) -> None:
    for k in range(n):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"[{nonce} {u}.{k}] {QUESTIONS[(u + k) % 4]}"}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        start = time.perf_counter()
        first = last = None
        tokens = 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    tokens += 1
        out.append((first - start, (last - first) / max(tokens - 1, 1)))


def batch_lines(n: int, max_tokens: int, nonce: str) -> bytes:
    lines = []
    for i in range(n):
        body = {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": f"[{nonce}] Write a line of a poem about the number {i}."}
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        lines.append({"custom_id": f"l-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


async def background_http(url: str, width: int, max_tokens: int, nonce: str, stop: asyncio.Event) -> int:
    """`width` loops of priority-10 requests until `stop`; output tokens they finished."""
    done = 0

    async def loop(w: int) -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            k = 0
            while not stop.is_set():
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"[{nonce} {w}.{k}] Count to twenty."}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "priority": 10,
                }
                r = await c.post("/v1/chat/completions", json=body)
                if r.status_code == 200:
                    done += r.json()["usage"]["completion_tokens"]
                k += 1

    await asyncio.gather(*(loop(w) for w in range(width)))
    return done


async def round_(url: str, sdk: openai.OpenAI, args, r: int, loaded: bool) -> tuple[list, float]:
    nonce = f"round {r} {'batch' if loaded else 'idle'}"
    samples: list = []
    stop = asyncio.Event()
    background = None
    batch = None
    if loaded and args.via == "http":
        background = asyncio.ensure_future(background_http(url, args.width, args.batch_tokens, nonce, stop))
    elif loaded:
        f = sdk.files.create(
            file=("b.jsonl", io.BytesIO(batch_lines(args.lines, args.batch_tokens, nonce))), purpose="batch"
        )
        batch = sdk.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await asyncio.sleep(args.settle)  # let the batch fill the engine first
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await asyncio.gather(
            *(user(c, u, args.requests, args.max_tokens, nonce, samples) for u in range(USERS))
        )
    wall = time.perf_counter() - start
    progress = 0.0
    if background is not None:
        stop.set()
        progress = await background / (time.perf_counter() - start)
    if batch is not None:
        b = sdk.batches.retrieve(batch.id)
        progress = (
            b.request_counts.completed * args.batch_tokens / (time.perf_counter() - start + args.settle)
        )
        sdk.batches.cancel(batch.id)
        while sdk.batches.retrieve(batch.id).status not in ("cancelled", "completed", "failed"):
            await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # whatever the engine still had in flight finishes
    print(
        f"round {r} {'batch' if loaded else 'idle '}: {wall:6.1f} s, batch {progress:6.1f} tok/s", flush=True
    )
    return samples, progress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="pairs of (idle, batch) rounds")
    ap.add_argument("--requests", type=int, default=3, help="requests per user per round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--via", choices=("batches", "http"), default="batches")
    ap.add_argument("--lines", type=int, default=512, help="lines of each round's batch")
    ap.add_argument("--width", type=int, default=32, help="--via http: concurrent low-priority requests")
    ap.add_argument("--batch-tokens", type=int, default=64)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds the batch runs before the users start")
    ap.add_argument("--url", default=None)
    ap.add_argument("--serve-arg", action="append", default=[])
    args = ap.parse_args()
    with served(args.url, args.serve_arg) as url:
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="none")
        asyncio.run(round_(url, sdk, args, -1, False))  # warm-up, untimed
        got: dict[bool, list] = {False: [], True: []}
        progress = []
        for r in range(args.rounds):
            for loaded in (False, True) if r % 2 == 0 else (True, False):
                samples, p = asyncio.run(round_(url, sdk, args, r, loaded))
                got[loaded] += samples
                if loaded:
                    progress.append(p)
    ttft = {k: statistics.median(s[0] for s in v) * 1000 for k, v in got.items()}
    tpot = {k: statistics.median(s[1] for s in v) * 1000 for k, v in got.items()}
    print()
    print(
        f"CPU: {cpu_name()} ({os.cpu_count()} cores); {USERS} users x {args.requests} requests x {args.rounds} "
        f"rounds each way; background via {args.via}; serve args: {' '.join(args.serve_arg) or 'none'}"
    )
    print(f"command: python benchmarks/batch_interference.py {' '.join(sys.argv[1:])}")
    print("| | no batch | batch running | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| TTFT p50 (ms) | {ttft[False]:.0f} | {ttft[True]:.0f} | {ttft[True] / ttft[False]:.2f} |")
    print(f"| TPOT p50 (ms) | {tpot[False]:.1f} | {tpot[True]:.1f} | {tpot[True] / tpot[False]:.2f} |")
    print(f"| batch output tok/s while users run | - | {statistics.median(progress):.1f} | |")


if __name__ == "__main__":
    main()
