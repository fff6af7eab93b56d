"""Structured outputs: what a json_schema constraint costs, measured side by side in one run.

    .venv/bin/python benchmarks/structured.py [--requests 48] [--concurrency 16] [--rounds 3]

Starts one ember server (`ember serve` as benchmarks/compare.py runs it, float32 unless `--ember-flags`) and, alternating which goes first
each round, sends it the same chat prompts unconstrained and with a json_schema response_format (a list
of 12 records, longer than the 128 tokens each request may generate, so both arms generate exactly 128
tokens and the difference is the cost of masking). Output throughput at `--concurrency`: median ratio of
the rounds. Then time to first token, one request at a time (max_tokens 1): unconstrained, a schema
never seen before (compiled for that request), and one already compiled (from the cache).
Writes benchmarks/STRUCTURED.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import MODEL, ROOT, _cpu_name, server  # noqa: E402

RECORDS = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "city": {"type": "string", "maxLength": 24},
                    "score": {"type": "integer", "minimum": 0, "maximum": 100},
                },
                "required": ["name", "city", "score"],
            },
            "minItems": 12,
            "maxItems": 12,
        }
    },
    "required": ["records"],
}


def _body(i: int, schema: dict | None, max_tokens: int) -> dict:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": f"List twelve people (set {i}) with their city and a score."}
        ],
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "people", "schema": schema}}
    return body


def throughput(url: str, schema: dict | None, n: int, conc: int) -> float:
    with httpx.Client(base_url=url, timeout=600) as client:

        def one(i: int) -> int:
            r = client.post("/v1/chat/completions", json=_body(i, schema, 128))
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        t = time.perf_counter()
        with ThreadPoolExecutor(conc) as pool:
            tokens = sum(pool.map(one, range(n)))
        return tokens / (time.perf_counter() - t)


def ttft_ms(url: str, schemas: list[dict | None]) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i, schema in enumerate(schemas):
            t = time.perf_counter()
            client.post("/v1/chat/completions", json=_body(i, schema, 1)).raise_for_status()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttft-samples", type=int, default=12)
    ap.add_argument(
        "--ember-flags", default="--kv-cache-memory 1GiB", help="`ember serve` flags (default: float32)"
    )
    args = ap.parse_args()
    args.concurrency = [args.concurrency]  # compare.server sizes peers by it
    log_dir = ROOT / "benchmarks" / "results" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        url, desc = stack.enter_context(server("ember", args, log_dir, args.ember_flags.split()))
        throughput(url, RECORDS, 4, 4)  # warm-up, and the schema compiled
        rounds = []
        for r in range(args.rounds):
            arms = [None, RECORDS] if r % 2 == 0 else [RECORDS, None]
            got = {json.dumps(a): throughput(url, a, args.requests, args.concurrency[0]) for a in arms}
            rounds.append((got[json.dumps(None)], got[json.dumps(RECORDS)]))
            print(
                f"round {r}: free {rounds[-1][0]:.1f} tok/s, json_schema {rounds[-1][1]:.1f} tok/s",
                flush=True,
            )
        k = args.ttft_samples
        fresh = [{**RECORDS, "title": f"fresh-{time.time_ns()}-{i}"} for i in range(k)]
        # interleaved, so drift on the machine touches all three alike
        free, new, cached = [], [], []
        for i in range(k):
            free += ttft_ms(url, [None])
            new += ttft_ms(url, [fresh[i]])
            cached += ttft_ms(url, [RECORDS])
    ratios = [c / f for f, c in rounds]
    md = [
        "# Structured outputs: cost of a json_schema constraint",
        "",
        f"Machine: {_cpu_name()}. Server: {desc}. Command: `.venv/bin/python benchmarks/structured.py`"
        f" (`--requests {args.requests} --concurrency {args.concurrency[0]} --rounds {args.rounds}`).",
        "",
        f"## Output throughput, {args.concurrency[0]} concurrent requests, 128 tokens each",
        "",
        "| round | unconstrained tok/s | json_schema tok/s | ratio |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {i} | {f:.1f} | {c:.1f} | {c / f:.2f} |" for i, (f, c) in enumerate(rounds)],
        f"| **median** | | | **{statistics.median(ratios):.2f}** |",
        "",
        f"## Time to first token, one request at a time (median of {k}, max_tokens 1)",
        "",
        "| request | TTFT p50 ms |",
        "| --- | ---: |",
        f"| unconstrained | {statistics.median(free):.0f} |",
        f"| json_schema, new (compiled for this request) | {statistics.median(new):.0f} |",
        f"| json_schema, cached | {statistics.median(cached):.0f} |",
        "",
    ]
    (ROOT / "benchmarks" / "STRUCTURED.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
