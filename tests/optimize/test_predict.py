"""Quality and cost around the prediction: lossless configs are not measured, a lossy setting once."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from ember.config import EngineConfig
from ember.optimize.predict import quality_of, with_cost
from ember.optimize.space import Candidate


def test_lossless_costs_no_quality_and_a_lossy_setting_is_measured_once(monkeypatch):
    import ember.quality.fidelity as fidelity

    calls = []
    monkeypatch.setattr(fidelity, "reference", lambda model, prompts, max_tokens: "ref")

    def measure(model, *, quantization, dtype, prompts, max_tokens, reference):
        calls.append((quantization, dtype, reference))
        return SimpleNamespace(agreement=0.9, kl_mean=0.05)

    monkeypatch.setattr(fidelity, "measure", measure)
    cache: dict = {}
    base = EngineConfig()
    spec = Candidate((("speculative.method", "ngram"),))
    q8 = Candidate((("quantization", "q8_0"),))
    q8_seqs = Candidate((("quantization", "q8_0"), ("scheduler.max_num_seqs", 4)))
    assert quality_of(spec, base, ["p"], cache) == {"quality": 1.0, "kl_mean": 0.0}
    assert quality_of(q8, base, ["p"], cache) == {"quality": 0.9, "kl_mean": 0.05}
    assert quality_of(q8_seqs, base, ["p"], cache)["quality"] == 0.9
    assert calls == [("q8_0", "float32", "ref")]


def test_cost_is_machine_time_per_million_good_tokens():
    m = {"duration": 10.0, "output_tokens": 100.0, "good_fraction": 0.5}
    # 10 machine-seconds for 50 good tokens: 200,000 s per million, at $3.6/h = $0.001/s
    assert with_cost(m, 3.6)["cost"] == pytest.approx(200.0)
    assert math.isinf(with_cost({**m, "good_fraction": 0.0}, 3.6)["cost"])
