"""The objective parser: constraints with units, one goal, clear errors naming what is wrong."""

from __future__ import annotations

import pytest

from ember.optimize.objective import Constraint, ObjectiveError, parse_objective


def test_constraints_with_units_and_a_goal():
    o = parse_objective("ttft_p95<=800ms, tpot_p95<=0.06s, quality>=0.98, minimize cost")
    assert o.constraints == (
        Constraint("ttft_p95", "<=", 800.0),
        Constraint("tpot_p95", "<=", 60.0),
        Constraint("quality", ">=", 0.98),
    )
    assert (o.goal, o.maximize) == ("cost", False)
    assert o.slos_ms == {"ttft": 800.0, "tpot": 60.0}


def test_a_goal_alone_and_the_default_goal():
    o = parse_objective("maximize goodput")
    assert (o.constraints, o.goal, o.maximize) == ((), "goodput", True)
    assert parse_objective("ttft_p50<=1s").goal == "cost"


def test_feasible_and_score():
    o = parse_objective("ttft_p95<=800ms, quality>=1.0, maximize goodput")
    assert o.feasible({"ttft_p95": 700, "quality": 1.0})
    assert not o.feasible({"ttft_p95": 700, "quality": 0.97})  # quality>=1.0 excludes every lossy config
    assert not o.feasible({"quality": 1.0})  # a metric not known is not met
    assert o.score({"goodput": 3.0}) < o.score({"goodput": 2.0})


@pytest.mark.parametrize(
    "text, says",
    [
        ("ttft_p99<=800ms, minimize cost", "unknown metric 'ttft_p99'; did you mean"),
        ("latency<=1s", "known: ttft_p50, ttft_p95"),
        ("minimize speed", "unknown metric 'speed'"),
        ("ttft_p95 is small", "neither a constraint"),
        ("ttft_p95<800ms", "use <= or >="),
        ("ttft_p95<=800min", "in ms or s"),
        ("minimize cost, maximize goodput", "one goal"),
        ("", "empty"),
    ],
)
def test_bad_objectives_say_what_is_wrong(text, says):
    with pytest.raises(ObjectiveError, match=says):
        parse_objective(text)
