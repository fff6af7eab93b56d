"""`evaluate`: one model on a list of items, graded, with each criterion's mean and bootstrap interval
(what a /v1/evals run computes, without the server's tables: `ember eval` with one model uses it), and
`summarize`, the per_testing_criteria_results both compute."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ember.evals.criteria import check_criteria
from ember.evals.graders import Grade, Judge, grade
from ember.evals.sampling import check_input_messages, check_sampling_params, sample
from ember.evals.stats import CONFIDENCE, N_BOOT, bootstrap_mean
from ember.server.platform import BATCH_PRIORITY, Caller

DEFAULT_SAMPLING = {"temperature": 0.0}  # greedy: a difference between models is not sampling noise
CONCURRENCY = 16


@dataclass
class Evaluation:
    model: str
    criteria: list[dict]  # summarize()'s: OpenAI's per_testing_criteria_results with `ember` stats
    items: list[dict] = field(repr=False)  # {item, sample, results, status}
    seed: int = 0
    n_boot: int = N_BOOT
    confidence: float = CONFIDENCE

    def as_dict(self) -> dict:
        return asdict(self)


def item_status(sample: dict, grades: list[Grade]) -> str:
    """An output item's status: error (no sample, or a criterion could not grade), pass (every criterion
    passed), or fail."""
    if sample.get("error") is not None or any(g.error is not None for g in grades):
        return "error"
    return "pass" if all(g.passed for g in grades) else "fail"


async def grade_all(criteria: list[dict], item: dict, got: dict, judge: Judge) -> list[Grade]:
    """Every criterion's grade of one sample (an error grade for each when the sample has none)."""
    if got.get("error") is not None:
        why = "the model gave no answer: " + got["error"]["message"]
        return [Grade(c["name"], c["type"], None, False, error=why) for c in criteria]
    return list(await asyncio.gather(*(grade(c, item, got, judge) for c in criteria)))


def summarize(
    criteria: list[dict],
    graded: list[dict],
    seed: int = 0,
    n_boot: int = N_BOOT,
    confidence: float = CONFIDENCE,
) -> list[dict]:
    """OpenAI's per_testing_criteria_results from graded items ({results: [one per criterion]}), each
    with ember's `ember` object: the mean score over the items it graded and its bootstrap interval."""
    out = []
    for k, criterion in enumerate(criteria):
        results = [g["results"][k] for g in graded]
        scores = [r["score"] for r in results if r.get("score") is not None]
        stats = {"n": len(scores), "errored": len(results) - len(scores), "confidence": confidence}
        if scores:
            ci = bootstrap_mean(scores, seed=seed, n_boot=n_boot, confidence=confidence)
            stats.update(mean=ci.estimate, ci_low=ci.low, ci_high=ci.high, seed=seed, n_boot=n_boot)
        else:
            stats.update(mean=None, ci_low=None, ci_high=None)
        out.append(
            {
                "testing_criteria": criterion["name"],
                "type": criterion["type"],
                "passed": sum(1 for r in results if r.get("passed")),
                "failed": sum(1 for r in results if not r.get("passed") and r.get("score") is not None),
                "ember": stats,
            }
        )
    return out


async def evaluate(
    call: Caller,
    items: list[dict],
    criteria: list[dict],
    input_messages: dict | list,
    model: str,
    *,
    sampling_params: dict | None = None,
    tenant: str | None = None,
    priority: int = BATCH_PRIORITY,
    seed: int = 0,
    n_boot: int = N_BOOT,
    confidence: float = CONFIDENCE,
    concurrency: int = CONCURRENCY,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Sample `model` on every item and grade it: the arguments as ember.evals.compare.compare's."""
    criteria = check_criteria(criteria)
    template = check_input_messages(input_messages)
    params = {**DEFAULT_SAMPLING, **check_sampling_params(sampling_params)}
    judge = Judge(call, tenant, priority)
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one(item: dict) -> dict:
        nonlocal done
        async with gate:
            got = await sample(call, model, template, item, params, tenant, priority)
            grades = await grade_all(criteria, item, got, judge)
        done += 1
        if progress is not None:
            progress(done, len(items))
        return {
            "item": item,
            "sample": got,
            "results": [g.result() for g in grades],
            "status": item_status(got, grades),
        }

    graded = list(await asyncio.gather(*(one(item) for item in items)))
    return Evaluation(
        model, summarize(criteria, graded, seed, n_boot, confidence), graded, seed, n_boot, confidence
    )
