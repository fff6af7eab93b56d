"""The search with fakes for the predictor and the replays: it measures few, picks by measurement,
resumes from its state, and explains an infeasible objective."""

from __future__ import annotations

import pytest

from ember.optimize.objective import parse_objective
from ember.optimize.search import State, pareto, search
from ember.optimize.space import Candidate

SEQS = [1, 2, 4, 8, 16, 32, 64, 128]


def _cands():
    return [Candidate(()), *(Candidate((("scheduler.max_num_seqs", s),)) for s in SEQS)]


def _truth(c: Candidate) -> dict:
    """More sequences: higher goodput, slower TTFT; a fake world."""
    s = c.get("scheduler.max_num_seqs", 128)
    return {
        "ttft_p95": 100.0 * s,
        "goodput": float(s),
        "duration": 1.0,
        "output_tokens": 10.0,
        "good_fraction": 1.0,
    }


def _run(tmp_path, objective: str, replays: int = 3, predict_bias: float = 1.0):
    measured = []

    def predict(c):
        return {**_truth(c), "ttft_p95": _truth(c)["ttft_p95"] * predict_bias}

    def measure(c):
        measured.append(c.key)
        return _truth(c)

    out = search(
        _cands()[1:],
        Candidate(()),
        parse_objective(objective),
        predict,
        lambda c: {"quality": 1.0},
        measure,
        lambda m: {**m, "cost": 1.0 / m["goodput"]},
        State(tmp_path / "state.json", "scope"),
        replays,
    )
    return out, measured


def test_the_pick_is_the_best_measured_feasible_config_with_few_replays(tmp_path):
    out, measured = _run(tmp_path, "ttft_p95<=1000ms, maximize goodput")
    assert len(measured) == 3 and measured[0] == Candidate(()).key  # the default is always measured
    assert out.by_key[out.pick].get("scheduler.max_num_seqs") == 8  # 800 ms; 16 would be 1600


def test_optimistic_predictions_are_caught_by_the_replays(tmp_path):
    # predicted TTFT half the truth: 16 seqs looks feasible (800 ms) but measures 1600 ms
    out, _ = _run(tmp_path, "ttft_p95<=1000ms, maximize goodput", replays=4, predict_bias=0.5)
    assert out.by_key[out.pick].get("scheduler.max_num_seqs") == 8


def test_a_rerun_resumes_from_the_state(tmp_path):
    _run(tmp_path, "ttft_p95<=1000ms, maximize goodput")
    _, measured = _run(tmp_path, "ttft_p95<=1000ms, maximize goodput")
    assert measured == []


def test_infeasible_names_the_constraint_and_the_closest_config(tmp_path):
    out, _ = _run(tmp_path, "ttft_p95<=50ms, maximize goodput")
    assert out.pick is None
    assert "no configuration meets ttft_p95<=50ms" in out.infeasible
    assert "closest: seqs=1" in out.infeasible


def test_pareto_keeps_only_undominated_points():
    pts = {
        "a": {"quality": 1.0, "ttft_p95": 100, "cost": 5},
        "b": {"quality": 1.0, "ttft_p95": 200, "cost": 5},  # dominated by a
        "c": {"quality": 0.9, "ttft_p95": 50, "cost": 1},
    }
    assert set(pareto(pts, "ttft_p95")) == {"a", "c"}


@pytest.mark.parametrize("replays", [1, 2])
def test_the_replay_budget_is_kept(tmp_path, replays):
    _, measured = _run(tmp_path, "maximize goodput", replays=replays)
    assert len(measured) == replays


def test_the_defaults_replay_calibrates_the_predictions_of_the_rest(tmp_path):
    speed = {"x": 1.0}
    measured = []

    def predict(c):  # the profile thinks the machine is 4x faster than it is
        t = _truth(c)
        return {**t, "ttft_p95": t["ttft_p95"] / 4 * speed["x"], "tpot_p50": 10.0 / 4 * speed["x"]}

    def calibrate(p, m):
        speed["x"] *= m["tpot_p50"] / p["tpot_p50"]
        return speed["x"]

    out = search(
        _cands()[1:],
        Candidate(()),
        parse_objective("ttft_p95<=1000ms, maximize goodput"),
        predict,
        lambda c: {"quality": 1.0},
        lambda c: measured.append(c.key) or {**_truth(c), "tpot_p50": 10.0},
        lambda m: {**m, "cost": 1.0 / m["goodput"]},
        State(tmp_path / "state.json", "scope"),
        2,
        calibrate=calibrate,
    )
    assert out.calibration == pytest.approx(4.0)
    # uncalibrated, 32 seqs (800 ms predicted) would have been the one replay after the default's
    assert out.by_key[out.pick].get("scheduler.max_num_seqs") == 8
