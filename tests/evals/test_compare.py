"""compare() over a scripted caller: a better model B shows a positive difference with an interval above
zero, an equal one an interval around zero; the pairwise judge gives A s and B 1 - s; a model that fails
on some items leaves them out and counts them errored; requests run at the tenant and priority given."""

from __future__ import annotations

import asyncio

import pytest

from ember.errors import InvalidRequest
from ember.evals.compare import compare
from ember.server.platform import BATCH_PRIORITY
from tests.evals.fake_caller import FakeCaller, fair_judge

ITEMS = [{"q": f"what is {i} + 1?", "a": str(i + 1)} for i in range(40)]
TEMPLATE = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "{{item.q}}"}]
EXACT = {
    "type": "string_check",
    "name": "exact",
    "operation": "eq",
    "input": "{{sample.output_text}}",
    "reference": "{{item.a}}",
}
PAIR = {"type": "pairwise_model", "name": "judge", "model": "judge", "prompt": "{{item.q}}"}


def number(messages) -> int:
    return int(messages[-1]["content"].split()[2])


def right(messages, _body) -> str:
    return str(number(messages) + 1)


def right_if_even(messages, _body) -> str:  # right on half the items
    n = number(messages)
    return str(n + 1) if n % 2 == 0 else "?"


def test_a_better_model_b_is_improved_with_an_interval_above_zero():
    caller = FakeCaller({"base": right_if_even, "tuned": right, "judge": fair_judge(lambda t: t != "?")})
    seen = []
    got = asyncio.run(
        compare(
            caller,
            ITEMS,
            [EXACT, PAIR],
            TEMPLATE,
            "base",
            "tuned",
            tenant="t1",
            progress=lambda d, n: seen.append((d, n)),
        )
    )
    exact = got.criterion("exact")
    assert (exact.mean_a, exact.mean_b, exact.diff, exact.n, exact.errored) == (0.5, 1.0, 0.5, 40, 0)
    assert 0.3 < exact.ci_low < 0.5 < exact.ci_high <= 0.7 and exact.improved
    assert exact.scores_a[:4] == [1.0, 0.0, 1.0, 0.0] and exact.scores_b[:4] == [1.0] * 4
    assert exact.ci_a[0] < 0.5 < exact.ci_a[1] and exact.ci_b == (1.0, 1.0)
    judge = got.criterion("judge")
    # tuned wins the odd items (base said '?'), ties the even ones (the same answer)
    assert (judge.mean_a, judge.mean_b, judge.diff) == (0.25, 0.75, 0.5) and judge.improved
    first = got.items[1].results_a[1]
    assert first["verdict"] == "model_b" and [o["shown_as_a"] for o in first["orderings"]] == [
        "model_a",
        "model_b",
    ]
    assert got.items[1].sample_a["output_text"] == "?" and got.items[1].sample_b["output_text"] == "2"
    assert seen[-1] == (40, 40) and len(seen) == 40
    assert {(c[2], c[3]) for c in caller.calls} == {("t1", BATCH_PRIORITY)}
    sampled = [c[1] for c in caller.calls if c[1]["model"] == "base"]
    assert (
        sampled[0]["temperature"] == 0.0 and sampled[0]["messages"][0]["content"] == "Answer with a number."
    )


def test_equal_models_have_an_interval_around_zero_and_are_not_improved():
    caller = FakeCaller({"a": right_if_even, "b": right_if_even})
    got = asyncio.run(compare(caller, ITEMS, [EXACT], TEMPLATE, "a", "b", seed=1))
    exact = got.criterion("exact")
    assert exact.diff == 0.0 and exact.ci_low == exact.ci_high == 0.0 and not exact.improved
    again = asyncio.run(compare(caller, ITEMS, [EXACT], TEMPLATE, "a", "b", seed=1))
    assert again.as_dict()["criteria"] == got.as_dict()["criteria"]


def test_items_a_model_fails_on_are_left_out_and_counted():
    class Failing(FakeCaller):  # model b is not found for the first ten items
        async def __call__(self, path, body, tenant, priority):
            if body["model"] == "b" and number(body["messages"]) < 10:
                return await super().__call__(path, {**body, "model": "gone"}, tenant, priority)
            return await super().__call__(path, body, tenant, priority)

    got = asyncio.run(compare(Failing({"a": right, "b": right}), ITEMS, [EXACT], TEMPLATE, "a", "b"))
    exact = got.criterion("exact")
    assert (exact.n, exact.errored, exact.diff) == (30, 10, 0.0)
    assert exact.scores_b[:10] == [None] * 10 and exact.scores_a[0] == 1.0
    assert "not found" in got.items[0].results_b[0]["error"]


def test_bad_criteria_and_templates_are_refused_before_anything_runs():
    caller = FakeCaller({})
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(compare(caller, ITEMS, [{**EXACT, "operation": "gt"}], TEMPLATE, "a", "b"))
    assert info.value.param == "testing_criteria[0].operation"
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(compare(caller, ITEMS, [EXACT], {"type": "template", "template": []}, "a", "b"))
    assert info.value.param == "input_messages.template"
    assert caller.calls == []
