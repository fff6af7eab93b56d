"""The files a search leaves: the spec serves, the report says what binds and how wrong it was."""

from __future__ import annotations

from ember.config import DeploymentSpec, EngineConfig
from ember.optimize import report
from ember.optimize.objective import parse_objective
from ember.optimize.search import Outcome
from ember.optimize.space import Candidate


def _m(ttft: float, goodput: float, quality: float = 1.0) -> dict:
    latency = {"ttft_p50": ttft, "ttft_p95": ttft, "tpot_p50": 50.0, "tpot_p95": 60.0}
    return {**latency, "goodput": goodput, "cost": 1 / goodput, "quality": quality}


def test_report_spec_and_plot(tmp_path):
    base, pick = Candidate(()), Candidate((("scheduler.max_num_seqs", 8),))
    out = Outcome(
        [base, pick],
        predicted={base.key: _m(300, 1.0), pick.key: _m(400, 2.0)},
        measured={base.key: _m(330, 1.0), pick.key: _m(500, 1.8)},
        front=[base.key, pick.key],
        baseline=base.key,
        pick=pick.key,
        latency="ttft_p95",
        calibration=2.0,
        uncalibrated=_m(150, 1.5),
    )
    goal = parse_objective("ttft_p95<=600ms, maximize goodput")
    spec = report.write(out, goal, EngineConfig(), tmp_path, "test")
    assert DeploymentSpec.load(spec).engine.scheduler.max_num_seqs == 8
    text = (tmp_path / "report.md").read_text()
    assert "**Pick:** seqs=8" in text and "**Binding constraint:** ttft_p95<=600ms" in text
    assert "| (default, before calibration) | -55% |" in text  # 150 predicted, 330 measured
    assert "| seqs=8 | -20% |" in text
    assert "the default left out): 10%" in text  # seqs=8: TTFT -20%, TPOT 0%
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
