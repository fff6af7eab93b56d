"""How fast a dataset is made from stored traces, and how many planted duplicates dedupe finds.

    PYTHONPATH=. .venv/bin/python benchmarks/flywheel_dataset.py --traces 10000

Writes --traces synthetic support traces into a temporary SQLite store (as the recorder does): distinct
prompts, plus exact copies (case and whitespace changed) and near copies (one word changed) of some of
them, with a fixed seed. Then times ember.flywheel.dataset.build (select, exact + MinHash LSH dedupe,
SFT lines) and export (the /v1/files file). A prompt and its copies are one group; dedupe is right for a
group when exactly one of its traces is kept: more is a missed duplicate, none a wrong merge with another.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections import Counter

from ember.flywheel.dataset import Selection, build, export
from ember.flywheel.dedupe import DedupeConfig
from ember.server.platform import Platform
from ember.store.traces import traces

WORDS = [
    "order",
    "refund",
    "delivery",
    "late",
    "account",
    "password",
    "invoice",
    "shipping",
    "address",
    "broken",
    "screen",
    "battery",
    "charger",
    "warranty",
    "cancel",
    "subscription",
    "upgrade",
    "plan",
    "discount",
    "coupon",
    "tracking",
    "parcel",
    "courier",
    "damaged",
    "missing",
    "item",
    "size",
    "colour",
    "exchange",
    "return",
    "label",
    "payment",
    "card",
    "declined",
    "bank",
    "transfer",
]


def prompt(rng: random.Random) -> str:
    return f"Customer #{rng.randrange(10**6)}: " + " ".join(
        rng.choice(WORDS) for _ in range(rng.randint(18, 40))
    )


def near_copy(rng: random.Random, text: str) -> str:
    words = text.split()
    i = rng.randrange(2, len(words))
    words[i] = rng.choice([w for w in WORDS if w != words[i]])
    return " ".join(words)


def row(i: int, text: str, group: int) -> dict:
    tid = f"chatcmpl-{i}"
    return {
        "id": tid,
        "tenant": "t",
        "created_at": 1_700_000_000 + i,
        "model": "support-bot",
        "adapter": None,
        "stream": False,
        "request": {"model": "support-bot", "messages": [{"role": "user", "content": text}]},
        "response": {
            "id": tid,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "Sorry!"}, "finish_reason": "stop"}
            ],
        },
        "metadata": {"task": "support", "group": str(group)},
        "usage": None,
        "latency_ms": 1.0,
        "ttft_ms": 1.0,
        "cached_tokens": 0,
        "score": None,
        "labels": [],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=10000)
    ap.add_argument("--exact", type=float, default=0.2, help="fraction of traces that are exact copies")
    ap.add_argument("--near", type=float, default=0.2, help="fraction that are one-word-changed copies")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    distinct: list[str] = []
    rows = []
    for i in range(args.traces):
        r = rng.random()
        g = rng.randrange(len(distinct)) if distinct else 0
        if distinct and r < args.exact:
            rows.append(row(i, "  " + distinct[g].upper(), g))
        elif distinct and r < args.exact + args.near:
            rows.append(row(i, near_copy(rng, distinct[g]), g))
        else:
            distinct.append(prompt(rng))
            rows.append(row(i, distinct[-1], len(distinct) - 1))
    with tempfile.TemporaryDirectory() as root:
        platform = Platform.open(root, f"sqlite:///{root}/ember.db", 1 << 30)
        with platform.store.tx() as conn:
            conn.execute(traces.insert(), rows)
        started = time.perf_counter()
        dataset = asyncio.run(
            build(
                platform.store,
                "t",
                Selection(metadata={"task": "support"}),
                dedupe_config=DedupeConfig(args.threshold),
            )
        )
        built = time.perf_counter()
        file = export(platform, "t", dataset, "support.jsonl")
        done = time.perf_counter()
    group_of = {r["id"]: r["metadata"]["group"] for r in rows}
    kept_per_group = Counter(group_of[t] for t in dataset.trace_ids)
    right = sum(1 for g in set(group_of.values()) if kept_per_group[g] == 1)
    missed = sum(n - 1 for n in kept_per_group.values() if n > 1)
    merged = len(set(group_of.values())) - len(kept_per_group)
    print(
        f"{args.traces} traces: build {built - started:.2f} s ({args.traces / (built - started):.0f} traces/s), "
        f"export {done - built:.3f} s, file {file['bytes']} bytes, {len(dataset.lines)} lines"
    )
    print(f"counts: {dict(sorted(dataset.counts.items()))}")
    print(
        f"groups {len(distinct)}: one trace kept {right}, duplicates missed {missed}, groups wrongly merged {merged}"
    )


if __name__ == "__main__":
    main()
