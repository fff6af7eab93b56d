"""Speculative decoding: output throughput with and without it, measured side by side in one run.

    .venv/bin/python benchmarks/speculative.py [--rounds 2] [--draft-layers 10]

Starts `ember serve` (as benchmarks/compare.py runs it, float32 unless `--ember-flags`) three times: plain,
with `--speculative ngram`, and with a draft model (the default model's own first `--draft-layers` layers,
an untrained truncated copy). Then, each round in alternating order, the same greedy chat requests go to
each server:

- grounded, one at a time: the answer copies the prompt (repeat, correct or lightly edit a given
  paragraph), the workload prompt lookup is for. Plain, ngram and draft.
- open, one at a time: questions whose answers do not copy the prompt. Plain and ngram.
- grounded, 16 at a time (32 requests): the batch is too large for speculation to pay, and the adaptive
  switch should leave it off until the batch thins out. Plain and ngram.

Greedy speculation is exact, so every arm generates the same tokens; output tokens per second is the
completion tokens (from usage) over the wall time, median ratio over the rounds. Acceptance rates come
from the servers' /metrics. Writes benchmarks/SPECULATIVE.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import MODEL, ROOT, _cpu_name, server  # noqa: E402

PARAGRAPHS = [
    "The committee met on Tuesday to discuss the budget for the new library, which will open next spring "
    "near the river. Members agreed that the reading room should have more windows and that the children's "
    "section needs new shelves.",
    "Our bakery opens at seven every morning except Sunday. We sell fresh bread, croissants and seasonal "
    "fruit tarts, and we take orders for birthday cakes at least three days in advance.",
    "To reset the router, hold the small button on the back for ten seconds until the light turns orange. "
    "Wait two minutes for it to restart, then connect again with the password printed on the label.",
    "The museum's new exhibition brings together maps drawn by sailors between 1500 and 1700. Visitors can "
    "see how the coastlines of Africa and South America slowly took their modern shape.",
    "Please remember that the office will be closed on Friday for the holiday. Any urgent requests should be "
    "sent to the support address, and someone will answer them on Monday morning.",
    "The recipe needs two cups of flour, one cup of sugar, three eggs and a spoon of butter. Mix everything "
    "in a large bowl, pour it into a tin and bake for forty minutes.",
    "Last year the city planted more than two thousand trees along its main streets. This year it plans to "
    "add small parks in the northern districts, where families have asked for more green space.",
    "The train to the coast leaves from platform four at half past nine. Passengers with bicycles should use "
    "the last carriage, and tickets can be bought on board with a card.",
]
TASKS = [
    "Repeat this text exactly:\n\n{}",
    "Fix any spelling mistakes and return the corrected text:\n\n{}",
    "Rewrite this text, changing nothing but the first word:\n\n{}",
]
QUESTIONS = [
    "What is the capital of France, and what is it famous for?",
    "Give three tips for sleeping better.",
    "Explain what a rainbow is to a child.",
    "Why do cats purr?",
    "Write a short poem about autumn.",
    "What are the planets of the solar system?",
    "How do I boil an egg?",
    "Describe a good breakfast.",
]


def _typo(text: str, i: int) -> str:
    """One misspelt word, so that 'fix the spelling' has something to fix."""
    words = text.split()
    j = (7 * i + 3) % len(words)
    w = words[j]
    words[j] = w[:2] + w[3:] if len(w) > 4 else w
    return " ".join(words)


def grounded(n: int) -> list[str]:
    return [TASKS[i % len(TASKS)].format(_typo(PARAGRAPHS[i % len(PARAGRAPHS)], i)) for i in range(n)]


def run(url: str, prompts: list[str], conc: int, max_tokens: int) -> tuple[float, int]:
    """-> (output tokens per second, output tokens)."""
    with httpx.Client(base_url=url, timeout=900) as client:

        def one(prompt: str) -> int:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": max_tokens,
            }
            r = client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        t = time.perf_counter()
        with ThreadPoolExecutor(conc) as pool:
            tokens = sum(pool.map(one, prompts))
        return tokens / (time.perf_counter() - t), tokens


def spec_counters(url: str) -> tuple[float, float, float]:
    text = httpx.get(url + "/metrics").text

    def get(name: str) -> float:
        m = re.search(rf"^ember:spec_decode_num_{name}_tokens_total (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    return get("draft"), get("accepted"), get("emitted")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--single", type=int, default=8, help="requests in each one-at-a-time workload")
    ap.add_argument("--batch", type=int, default=32, help="requests in the 16-at-a-time workload")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--draft-layers", type=int, default=10)
    ap.add_argument("--ember-flags", default="--kv-cache-memory 1GiB", help="flags for every ember server")
    args = ap.parse_args()
    args.concurrency = [args.concurrency]  # compare.server sizes peers by it
    k = ["--num-speculative-tokens", str(args.num_speculative_tokens)]
    arms = {
        "plain": [],
        "ngram": ["--speculative", "ngram", *k],
        "draft": ["--speculative", f"draft:{MODEL}", "--draft-num-layers", str(args.draft_layers), *k],
    }
    workloads = {  # name: (prompts, concurrency, arms)
        "grounded, 1 at a time": (grounded(args.single), 1, ["plain", "ngram", "draft"]),
        "open, 1 at a time": (QUESTIONS[: args.single], 1, ["plain", "ngram"]),
        f"grounded, {args.concurrency[0]} at a time": (
            grounded(args.batch),
            args.concurrency[0],
            ["plain", "ngram"],
        ),
    }
    flags = args.ember_flags.split()
    results: dict[str, dict[str, list[float]]] = {
        w: {a: [] for a in spec[2]} for w, spec in workloads.items()
    }
    acceptance: dict[str, dict[str, tuple[float, float, float]]] = {w: {} for w in workloads}
    tokens: dict[str, int] = {}
    with ExitStack() as stack:
        urls, desc = {}, {}
        for name, extra in arms.items():
            log_dir = ROOT / "benchmarks" / "results" / "logs" / f"speculative-{name}"
            log_dir.mkdir(parents=True, exist_ok=True)
            urls[name], desc[name] = stack.enter_context(server("ember", args, log_dir, flags + extra))
            run(urls[name], grounded(2), 2, 16)  # warm-up
        for r in range(args.rounds):
            for w, (prompts, conc, names) in workloads.items():
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    before = spec_counters(urls[name])
                    tps, n = run(urls[name], prompts, conc, args.max_tokens)
                    after = spec_counters(urls[name])
                    results[w][name].append(tps)
                    acceptance[w][name] = tuple(a - b for a, b in zip(after, before, strict=True))
                    if tokens.setdefault(w, n) != n:
                        print(f"warning: {name} generated {n} tokens on '{w}', another arm {tokens[w]}")
                    print(f"round {r} {w}: {name} {tps:.1f} tok/s ({n} tokens)", flush=True)
    md = [
        "# Speculative decoding: output throughput with and without it",
        "",
        f"Machine: {_cpu_name()}. Command: `.venv/bin/python benchmarks/speculative.py` (`--rounds {args.rounds}"
        f" --single {args.single} --batch {args.batch} --max-tokens {args.max_tokens}`), greedy chat requests,"
        " every arm generating the same tokens. Servers:",
        "",
        *[f"- {name}: {desc[name]}" for name in arms],
        "",
        "| workload | arm | output tok/s (median) | vs plain (median of rounds) | acceptance | tokens per verification |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for w, per_arm in results.items():
        for name, values in per_arm.items():
            ratios = [v / p for v, p in zip(values, per_arm["plain"], strict=True)]
            drafted, accepted, emitted = acceptance[w].get(name, (0.0, 0.0, 0.0))  # the last round's
            rate = f"{accepted / drafted:.0%}" if drafted else "-"
            per_step = f"{emitted / (emitted - accepted):.2f}" if emitted > accepted else "-"
            ratio = "1.00" if name == "plain" else f"**{statistics.median(ratios):.2f}**"
            md.append(f"| {w} | {name} | {statistics.median(values):.1f} | {ratio} | {rate} | {per_step} |")
    md.append("")
    (ROOT / "benchmarks" / "SPECULATIVE.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
