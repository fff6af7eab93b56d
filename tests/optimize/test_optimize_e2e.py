"""End to end on the default model: a quick profile of this machine, every candidate predicted through the
real scheduler, two real replays on `ember serve --config`, and the files a user reads."""

from __future__ import annotations

import math

import pytest

from ember.config import CacheConfig, DeploymentSpec, EngineConfig
from ember.optimize import predict as pr
from ember.optimize import report
from ember.optimize.objective import parse_objective
from ember.optimize.profile import load_or_measure
from ember.optimize.replay import replay
from ember.optimize.search import State, search
from ember.optimize.space import Candidate
from ember.optimize.workload import generate

pytestmark = pytest.mark.slow

QUICK = ((2, 24, 4, 2048), (1, 96, 2, 64))  # a rough profile: enough to rank, fast to take


def test_predict_then_two_replays_write_the_front_spec_and_report(tmp_path, monkeypatch, default_model_dir):
    monkeypatch.setenv("EMBER_DATA_DIR", str(tmp_path / "data"))
    model = str(default_model_dir)
    work = generate("chat", num_requests=4, rate=math.inf, output_len=8, model=model)
    base = EngineConfig(model=model, cache=CacheConfig(kv_cache_memory="64MiB"))
    goal = parse_objective("ttft_p95<=600s, maximize goodput")
    predictor = pr.Predictor(
        work, base, goal.slos_ms, profiles=lambda m, q, d: load_or_measure(m, q, d, shapes=QUICK)
    )
    grid = [Candidate((("scheduler.max_num_seqs", 1),)), Candidate((("scheduler.max_num_seqs", 4),))]
    names = iter(range(10))
    out = search(
        grid,
        Candidate(()),
        goal,
        predictor,
        lambda c: pr.quality_of(c, base, [], {}),
        lambda c: replay(c.engine(base), work, goal.slos_ms, tmp_path / "replays", f"c{next(names)}"),
        lambda m: pr.with_cost(m, 0.10),
        State(tmp_path / "out" / "state.json", "e2e"),
        replays=2,
    )
    assert len(out.predicted) == 3 and len(out.measured) == 2
    for m in out.measured.values():
        assert m["output_tokens"] == 4 * 8 and m["goodput"] > 0 and m["cost"] > 0
    # one sequence at a time must predict (and measure) a slower TTFT than four together
    one = Candidate((("scheduler.max_num_seqs", 1),)).key
    four = Candidate((("scheduler.max_num_seqs", 4),)).key
    assert out.predicted[one]["ttft_p95"] > out.predicted[four]["ttft_p95"]
    assert out.pick is not None
    spec = report.write(out, goal, base, tmp_path / "out", "e2e")
    assert DeploymentSpec.load(spec).engine.model == model
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Prediction error" in text and "Binding constraint" in text
    assert (tmp_path / "out" / "front.png").read_bytes()[:4] == b"\x89PNG"
