"""The promotion gate's rule, case by case, and the CLI's --traces parsing."""

from __future__ import annotations

import pytest
import typer

from ember.flywheel.cli import parse_traces
from ember.flywheel.gate import Gate, decide


def crit(name: str, diff: float | None, low: float | None = None, high: float | None = None) -> dict:
    return {"name": name, "mean_a": 0.2, "mean_b": None if diff is None else 0.2 + diff, "diff": diff,
            "ci_low": low, "ci_high": high, "n": 0 if diff is None else 40, "errored": 40 if diff is None else 0}  # fmt: skip


def test_promotes_only_on_a_confident_gain_with_no_guard_down():
    assert decide({"criteria": [crit("em", 0.5, 0.3, 0.7), crit("sim", -0.1, -0.2, 0.01)]}, Gate())["promote"]
    no_gain = decide({"criteria": [crit("em", 0.1, 0.0, 0.2)]}, Gate())
    assert not no_gain["promote"] and no_gain["reasons"][0].startswith("em: improvement")
    guard = decide({"criteria": [crit("em", 0.5, 0.3, 0.7), crit("sim", -0.1, -0.2, -0.01)]}, Gate())
    assert [c["passed"] for c in guard["checks"]] == [True, False]


def test_the_primary_may_be_another_criterion_and_unscored_fails():
    both = {"criteria": [crit("em", 0.0, -0.1, 0.1), crit("sim", 0.3, 0.1, 0.5)]}
    assert decide(both, Gate(primary="sim"))["promote"] and not decide(both, Gate())["promote"]
    unscored = decide({"criteria": [crit("em", None)]}, Gate())
    assert not unscored["promote"] and "no item was scored" in unscored["reasons"][0]


def test_the_latency_guard():
    slow = {"criteria": [crit("em", 0.5, 0.3, 0.7)], "latency_ms": {"a": [10, 10, 12], "b": [30, 31, 29]}}
    assert not decide(slow, Gate())["promote"]
    assert decide(slow, Gate(max_latency_ratio=4.0))["promote"]
    assert decide(slow, Gate(max_latency_ratio=None))["promote"]
    with pytest.raises(ValueError, match="max_latency_ratio"):
        Gate(max_latency_ratio=0.5)


def test_traces_filters_and_tags():
    assert parse_traces("tag=support, model=m,min_score=0.5,created_after=10,limit=3") == {
        "metadata": {"tag": "support"}, "model": "m", "min_score": 0.5, "created_after": 10, "limit": 3}  # fmt: skip
    assert parse_traces("") == {}
    for bad in ("tag", "created_after=yesterday"):
        with pytest.raises(typer.BadParameter):
            parse_traces(bad)
