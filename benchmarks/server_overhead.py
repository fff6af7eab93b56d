"""Server overhead: output tokens/s through HTTP (16 concurrent streams) vs the offline engine, same batch.

    .venv/bin/python benchmarks/server_overhead.py [--streams 16] [--max-tokens 128] [--rounds 3]

Runs, in one go on this machine: the offline engine (`LLM.generate` on all prompts at once), then
`ember serve` with the engine core on a thread and in a process, each driven by N concurrent streaming
completions of the same prompts (EOS ignored, so every run generates the same number of tokens).
Prints tokens/s and the ratio to offline for each; the best of `--rounds` runs counts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ember import LLM, SamplingParams
from ember.models.catalog import DEFAULT_MODEL

TOPICS = ["rivers", "mountains", "the moon", "bread", "trains", "owls", "glass", "winter", "maps", "bees"]


def prompts(n: int) -> list[str]:
    return [f"Write a detailed essay about {TOPICS[i % len(TOPICS)]}, part {i}:" for i in range(n)]


def offline(args) -> float:
    llm = LLM(DEFAULT_MODEL, kv_cache_memory=args.kv_cache_memory)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts(2), SamplingParams(max_tokens=4))  # warm-up
    best = 0.0
    for _ in range(args.rounds):
        t = time.perf_counter()
        outs = llm.generate(prompts(args.streams), params)
        elapsed = time.perf_counter() - t
        best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
    del llm
    gc.collect()
    return best


async def _burst(url: str, args) -> float:
    async def one(http: httpx.AsyncClient, prompt: str) -> int:
        body = {
            "model": DEFAULT_MODEL,
            "prompt": prompt,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tokens = 0
        async with http.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    tokens = usage["completion_tokens"] if usage else tokens
        return tokens

    limits = httpx.Limits(max_connections=args.streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await one(http, "warm-up")
        best = 0.0
        for _ in range(args.rounds):
            t = time.perf_counter()
            counts = await asyncio.gather(*(one(http, p) for p in prompts(args.streams)))
            best = max(best, sum(counts) / (time.perf_counter() - t))
        return best


def served(mode: str, args) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ember = shutil.which("ember") or str(Path(sys.executable).parent / "ember")
    cmd = [ember, "serve", "--port", str(port), "--engine-mode", mode, "--embedding-model", "none"]
    cmd += ["--kv-cache-memory", args.kv_cache_memory, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return asyncio.run(_burst(url, args))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-cache-memory", default="512MiB")
    args = ap.parse_args()
    base = offline(args)
    rows = [("offline LLM.generate", base)]
    for mode in ("thread", "process"):
        rows.append((f"HTTP, core on a {mode}", served(mode, args)))
    print(f"\n{args.streams} streams x {args.max_tokens} tokens, {DEFAULT_MODEL}, best of {args.rounds}")
    print(f"{'':28} {'tok/s':>8} {'vs offline':>11}")
    for name, tps in rows:
        print(f"{name:28} {tps:8.1f} {tps / base:10.1%}")


if __name__ == "__main__":
    main()
