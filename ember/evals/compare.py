"""`compare`: two models on the same items, graded by the same criteria, with a paired bootstrap interval
of the difference per criterion. The flywheel's gate (is the candidate better than what the alias serves
now?) and `ember eval` with two models both stand on it.

`call` is how requests reach the models: PlatformContext.call inside the server, or `openai_caller`
over HTTP. Pointwise graders (string_check, text_similarity, python, score_model, label_model) grade
each model's answer on its own; a pairwise_model grader judges the two answers against each other, in
both orders (see ember.evals.graders.pairwise), giving model A the score s (1 win, 0.5 tie, 0 loss) and
model B 1 - s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ember.errors import InvalidRequest
from ember.evals.criteria import check_criteria
from ember.evals.evaluate import CONCURRENCY, DEFAULT_SAMPLING, grade_all
from ember.evals.graders import Grade, GradeError, Judge, pairwise
from ember.evals.sampling import check_input_messages, check_sampling_params, sample
from ember.evals.stats import CONFIDENCE, N_BOOT, bootstrap_mean, bootstrap_paired_diff
from ember.server.platform import BATCH_PRIORITY, Caller, CallResult


@dataclass
class CriterionComparison:
    """One criterion over the items both models were scored on (an item either side failed to grade is
    left out of every number here and counted in `errored`)."""

    name: str
    type: str
    n: int  # items scored on both sides
    errored: int
    mean_a: float | None
    mean_b: float | None
    diff: float | None  # mean_b - mean_a
    ci_low: float | None  # the paired bootstrap interval of diff
    ci_high: float | None
    ci_a: tuple[float, float] | None  # each mean's own interval
    ci_b: tuple[float, float] | None
    scores_a: list[float | None]  # per item, in the order given; None where it failed
    scores_b: list[float | None]

    @property
    def improved(self) -> bool:
        """Whether B is better than A with the interval's confidence: the lower bound is above zero."""
        return self.ci_low is not None and self.ci_low > 0


@dataclass
class ItemComparison:
    item: dict
    sample_a: dict
    sample_b: dict
    results_a: list[dict]  # OpenAI output-item results, one per criterion
    results_b: list[dict]


@dataclass
class Comparison:
    model_a: str
    model_b: str
    criteria: list[CriterionComparison]
    items: list[ItemComparison] = field(repr=False)
    seed: int = 0
    n_boot: int = N_BOOT
    confidence: float = CONFIDENCE

    def criterion(self, name: str) -> CriterionComparison:
        for c in self.criteria:
            if c.name == name:
                return c
        raise KeyError(f"no criterion '{name}'; known: {', '.join(c.name for c in self.criteria)}")

    def as_dict(self) -> dict:
        return asdict(self)


async def compare(
    call: Caller,
    items: list[dict],
    criteria: list[dict],
    input_messages: dict | list,
    model_a: str,
    model_b: str,
    *,
    sampling_params: dict | None = None,
    tenant: str | None = None,
    priority: int = BATCH_PRIORITY,
    seed: int = 0,
    n_boot: int = N_BOOT,
    confidence: float = CONFIDENCE,
    concurrency: int = CONCURRENCY,
    progress: Callable[[int, int], None] | None = None,
) -> Comparison:
    """Sample `model_a` and `model_b` on every item (the `{{item.*}}` namespace) with `input_messages`
    (OpenAI's template or item_reference, or a bare list of {role, content} templates) and grade both
    with `criteria` (OpenAI testing criteria, plus pairwise_model). Bad criteria or templates raise
    ember.errors.InvalidRequest naming the field; a model or judge failing on an item marks that item
    errored for the criteria it touches. `progress(done, total)` is called as items finish."""
    criteria = check_criteria(criteria)
    template = check_input_messages(input_messages)
    params = {**DEFAULT_SAMPLING, **check_sampling_params(sampling_params)}
    judge = Judge(call, tenant, priority)
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one(item: dict) -> ItemComparison:
        nonlocal done
        async with gate:
            sa, sb = await asyncio.gather(
                sample(call, model_a, template, item, params, tenant, priority),
                sample(call, model_b, template, item, params, tenant, priority),
            )
            graded = await asyncio.gather(*(_grade_pair(c, item, sa, sb, judge) for c in criteria))
        done += 1
        if progress is not None:
            progress(done, len(items))
        return ItemComparison(
            item, sa, sb, [ga.result() for ga, _ in graded], [gb.result() for _, gb in graded]
        )

    compared = list(await asyncio.gather(*(one(item) for item in items)))
    summary = [
        _summarize(
            c,
            [i.results_a[k] for i in compared],
            [i.results_b[k] for i in compared],
            seed,
            n_boot,
            confidence,
        )
        for k, c in enumerate(criteria)
    ]
    return Comparison(model_a, model_b, summary, compared, seed, n_boot, confidence)


async def _grade_pair(criterion: dict, item: dict, sa: dict, sb: dict, judge: Judge) -> tuple[Grade, Grade]:
    name, kind = criterion["name"], criterion["type"]
    failed = [s["error"]["message"] for s in (sa, sb) if s["error"] is not None]
    if kind == "pairwise_model":
        if failed:
            miss = Grade(name, kind, None, False, error="no answer to compare: " + "; ".join(failed))
            return miss, miss
        spaces = {"item": item, "sample": sa}
        try:
            ga = await pairwise(
                criterion, spaces, sa["output_text"], sb["output_text"], judge, ("model_a", "model_b")
            )
        except (GradeError, InvalidRequest) as exc:  # this item's error, not the comparison's
            miss = Grade(name, kind, None, False, error=str(exc))
            return miss, miss
        gb = Grade(
            name, kind, 1.0 - ga.score, 1.0 - ga.score >= criterion.get("pass_threshold", 1.0), extra=ga.extra
        )
        return ga, gb

    ga, gb = await asyncio.gather(*(grade_all([criterion], item, s, judge) for s in (sa, sb)))
    return ga[0], gb[0]


def _summarize(criterion: dict, ra: list[dict], rb: list[dict], seed: int, n_boot: int, confidence: float):
    scores_a = [r["score"] for r in ra]
    scores_b = [r["score"] for r in rb]
    both = [(a, b) for a, b in zip(scores_a, scores_b, strict=True) if a is not None and b is not None]
    base = {
        "name": criterion["name"],
        "type": criterion["type"],
        "n": len(both),
        "errored": len(ra) - len(both),
    }
    if not both:
        empty = dict.fromkeys(("mean_a", "mean_b", "diff", "ci_low", "ci_high", "ci_a", "ci_b"))
        return CriterionComparison(**base, **empty, scores_a=scores_a, scores_b=scores_b)
    a, b = [x for x, _ in both], [y for _, y in both]
    ia = bootstrap_mean(a, seed, n_boot, confidence)
    ib = bootstrap_mean(b, seed, n_boot, confidence)
    d = bootstrap_paired_diff(a, b, seed, n_boot, confidence)
    return CriterionComparison(
        **base,
        mean_a=ia.estimate,
        mean_b=ib.estimate,
        diff=d.estimate,
        ci_low=d.low,
        ci_high=d.high,
        ci_a=(ia.low, ia.high),
        ci_b=(ib.low, ib.high),
        scores_a=scores_a,
        scores_b=scores_b,
    )


def openai_caller(client) -> Caller:
    """A Caller over HTTP through an `openai.AsyncOpenAI` client (the server's key decides the tenant, so
    `tenant` is not sent; `priority` is, as ember's request field)."""
    import openai

    async def call(path: str, body: dict, tenant: str | None, priority: int) -> CallResult:
        if path != "/v1/chat/completions":
            raise ValueError(f"openai_caller calls /v1/chat/completions only, not {path}")
        try:
            answer = await client.chat.completions.create(**body, extra_body={"priority": priority})
        except openai.APIStatusError as exc:
            detail = exc.body if isinstance(exc.body, dict) else {"message": str(exc)}
            return CallResult(exc.status_code, {"error": detail.get("error", detail)})
        except openai.APIConnectionError as exc:
            return CallResult(
                503, {"error": {"message": f"cannot reach the server: {exc}", "code": "unreachable"}}
            )
        return CallResult(200, answer.model_dump())

    return call
