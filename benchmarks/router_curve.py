"""The learned router's must-show: on held-out questions graded against two real candidates, its cost/quality
curve over the threshold lies on or above random routing's at every cost.

The candidates are the default model (smollm2-135m-instruct) asked two ways, priced by the gateway's price
table per token: `zero-shot` (the question alone, ~40 prompt tokens) and `few-shot` (the same question after
twelve worked examples as earlier chat turns, ~10x the prompt tokens). That is what this machine really has:
one small model, no tuned adapter worth its price, and a prompt that costs more and helps on some tasks
(answer format, sentiment labels) but not others. The question mix spans six task families, generated from
fixed lists with a fixed seed; answers are greedy and graded by a rule per family.

    python benchmarks/router_curve.py                  # graded set from the cache if present, else the model
    python benchmarks/router_curve.py --regrade        # rebuild the graded set with the model (~minutes)

Writes benchmarks/results/router_graded.jsonl (the cache the tests train from), benchmarks/router_curve.png
and prints the table for benchmarks/ROUTER.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from ember.gateway.usage import PriceTable
from ember.router.curve import plot
from ember.router.examples import GradedExample, load_jsonl, write_jsonl
from ember.router.train import train

HERE = Path(__file__).resolve().parent
GRADED = HERE / "results" / "router_graded.jsonl"
PNG = HERE / "router_curve.png"
MODEL = "smollm2-135m-instruct"
CHEAP, DEAR = "zero-shot", "few-shot"
# USD per 1M tokens, both candidates the same model: the few-shot one costs more only by its prompt.
PRICES = {"models": {CHEAP: {"input": 0.1, "output": 0.2}, DEAR: {"input": 0.1, "output": 0.2}}}
SEED = 0
PER_FAMILY = 20
TEST_SHARE = 0.4  # of the graded set, held out from training for the curve
SUFFIX = " Answer in one word."

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Ireland": "Dublin", "Hungary": "Budapest", "Peru": "Lima", "Kenya": "Nairobi",
    "Thailand": "Bangkok", "Cuba": "Havana", "Chile": "Santiago", "Denmark": "Copenhagen", "Turkey": "Ankara",
    "Australia": "Canberra", "India": "Delhi", "Belgium": "Brussels", "Argentina": "Aires", "Iran": "Tehran",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "day": "night",
    "open": "closed", "light": "dark", "wet": "dry", "tall": "short", "rich": "poor", "early": "late",
    "hard": "soft", "full": "empty", "loud": "quiet", "strong": "weak", "black": "white", "true": "false",
    "win": "lose", "in": "out", "good": "bad", "old": "young", "heavy": "light", "love": "hate",
}  # fmt: skip
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
    "goose": "geese", "person": "people", "cat": "cats", "dog": "dogs", "box": "boxes", "city": "cities",
    "leaf": "leaves", "knife": "knives", "baby": "babies", "bus": "buses", "car": "cars", "fish": "fish",
}  # fmt: skip
GOOD = ["wonderful", "great", "amazing", "delightful", "excellent", "lovely", "fantastic"]
BAD = ["terrible", "awful", "boring", "horrible", "dreadful", "disappointing", "poor"]
THINGS = ["movie", "meal", "book", "hotel", "concert", "phone", "game"]
WORDS = ["apple", "river", "garden", "pencil", "window", "tiger", "candle", "planet", "silver", "orange"]


def questions(rng: random.Random) -> list[dict]:
    """PER_FAMILY questions of each family: {family, question, answer}."""
    out = []
    for _ in range(PER_FAMILY):
        country = rng.choice(list(CAPITALS))
        out.append(
            {
                "family": "capital",
                "question": f"What is the capital of {country}?",
                "answer": CAPITALS[country],
            }
        )
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        out.append({"family": "add", "question": f"What is {a} + {b}?", "answer": str(a + b)})
        word = rng.choice(list(OPPOSITES))
        out.append(
            {
                "family": "opposite",
                "question": f"What is the opposite of '{word}'?",
                "answer": OPPOSITES[word],
            }
        )
        noun = rng.choice(list(PLURALS))
        out.append(
            {"family": "plural", "question": f"What is the plural of '{noun}'?", "answer": PLURALS[noun]}
        )
        good = rng.random() < 0.5
        adjective, thing = rng.choice(GOOD if good else BAD), rng.choice(THINGS)
        out.append({
            "family": "sentiment",
            "question": f"Review: 'The {thing} was {adjective}.' Is this review positive or negative?",
            "answer": "positive" if good else "negative",
        })  # fmt: skip
        word = rng.choice(WORDS)
        out.append(
            {"family": "upper", "question": f"Write '{word}' in capital letters.", "answer": word.upper()}
        )
    rng.shuffle(out)
    return out


# Two worked examples per family, none of them among the questions' answers' own wording.
SHOTS = [
    ("What is the capital of Mexico?", "Mexico City"), ("What is 12 + 7?", "19"),
    ("What is the opposite of 'near'?", "far"), ("What is the plural of 'ox'?", "oxen"),
    ("Review: 'The park was beautiful.' Is this review positive or negative?", "positive"),
    ("Write 'lemon' in capital letters.", "LEMON"), ("What is the capital of Brazil?", "Brasilia"),
    ("What is 30 + 25?", "55"), ("What is the opposite of 'clean'?", "dirty"),
    ("What is the plural of 'wolf'?", "wolves"),
    ("Review: 'The train was dirty.' Is this review positive or negative?", "negative"),
    ("Write 'cloud' in capital letters.", "CLOUD"),
]  # fmt: skip


def conversation(question: str, few_shot: bool) -> list[dict]:
    turns = []
    if few_shot:
        for q, a in SHOTS:
            turns += [{"role": "user", "content": q + SUFFIX}, {"role": "assistant", "content": a}]
    return [*turns, {"role": "user", "content": question + SUFFIX}]


def grade(family: str, answer: str, text: str) -> float:
    """1 when the reply's first words give the answer (case matters only for `upper`), else 0."""
    words = re.findall(r"[A-Za-z0-9]+", text)[:6]
    if family == "upper":
        return float(answer in words)
    words = [w.lower() for w in words]
    if family == "sentiment":
        other = "negative" if answer == "positive" else "positive"
        return float(answer in words and other not in words)
    return float(answer.lower() in words)


def build_graded() -> list[GradedExample]:
    from ember import LLM, SamplingParams

    items = questions(random.Random(SEED))
    params = SamplingParams(temperature=0.0, max_tokens=6)
    llm = LLM(MODEL, seed=SEED)
    graded = [GradedExample(it["question"], {}, {}, {"family": it["family"]}) for it in items]
    try:
        for name, few in ((CHEAP, False), (DEAR, True)):
            start = time.perf_counter()
            if few:  # one request first, so the shared twelve-shot prefix is in the prefix cache for the rest
                llm.chat(conversation(items[0]["question"], few), params)
            outs = llm.chat([conversation(it["question"], few) for it in items], params, use_tqdm=True)
            print(f"{name}: {len(items)} answers in {time.perf_counter() - start:.0f} s")
            for g, it, out in zip(graded, items, outs, strict=True):
                g.scores[name] = grade(it["family"], it["answer"], out.outputs[0].text)
                g.usage[name] = {
                    "prompt_tokens": len(out.prompt_token_ids),
                    "completion_tokens": len(out.outputs[0].token_ids),
                }
    finally:
        llm.close()
    return graded


def family_table(graded: list[GradedExample]) -> list[str]:
    rows = [
        "| family | n | zero-shot right | few-shot right | prompt tokens (zero / few) |",
        "|---|---|---|---|---|",
    ]
    for family in sorted({g.metadata["family"] for g in graded}):
        part = [g for g in graded if g.metadata["family"] == family]
        right = [sum(g.scores[c] for g in part) / len(part) for c in (CHEAP, DEAR)]
        tokens = [sum(g.usage[c]["prompt_tokens"] for g in part) / len(part) for c in (CHEAP, DEAR)]
        rows.append(
            f"| {family} | {len(part)} | {right[0]:.0%} | {right[1]:.0%} | {tokens[0]:.0f} / {tokens[1]:.0f} |"
        )
    return rows


def curve_table(curve: dict) -> list[str]:
    rows = [
        "| threshold | cost per 1k requests (USD) | quality (router) | quality (random, same cost) | to few-shot |",
        "|---|---|---|---|---|",
    ]
    points = curve["points"]
    for p in [*points[:: max(1, len(points) // 12)], points[-1]]:
        rows.append(
            f"| {p['threshold']:.3f} | {p['cost'] * 1000:.5f} | {p['quality']:.3f} | {p['random_quality']:.3f} | "
            f"{p['shares'][1]:.0%} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regrade", action="store_true", help="rebuild the graded set with the model")
    args = parser.parse_args()
    if args.regrade or not GRADED.exists():
        graded = build_graded()
        write_jsonl(graded, GRADED)
    else:
        graded = load_jsonl(GRADED)
    start = time.perf_counter()
    router = train(graded, prices=PriceTable.parse(PRICES), holdout=TEST_SHARE, seed=SEED)
    seconds = time.perf_counter() - start
    report = router.report
    curve = report["heldout_curve"]
    plot(
        curve,
        router.candidates,
        str(PNG),
        title=f"{MODEL}: zero-shot vs few-shot, {report['heldout']} held out",
    )
    print("\n".join(family_table(graded)))
    print()
    for name, entry in report["candidates"].items():
        print(
            f"{name}: ${entry['cost_per_call'] * 1000:.5f} per 1k calls, held-out AUC {entry['heldout_auc']}"
        )
    print(f"trained in {seconds:.0f} s on {report['examples'] - report['heldout']} examples")
    print()
    print("\n".join(curve_table(curve)))
    print(f"\ndominates random at every cost: {curve['dominates']} (min gain {curve['min_gain']:+.3f}, "
          f"mean gain {curve['mean_gain']:+.3f})")  # fmt: skip
    print(json.dumps({"dominates": curve["dominates"], "min_gain": curve["min_gain"]}))


if __name__ == "__main__":
    main()
