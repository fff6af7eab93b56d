"""The router's must-show on real grades: trained on the cached graded set of benchmarks/router_curve.py
(smollm2-135m-instruct zero-shot vs few-shot), its held-out cost/quality curve dominates random routing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ember.gateway.usage import PriceTable
from ember.router.curve import compare, random_quality
from ember.router.examples import load_jsonl
from ember.router.train import train

GRADED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "router_graded.jsonl"
PRICES = {"models": {"zero-shot": {"input": 0.1, "output": 0.2}, "few-shot": {"input": 0.1, "output": 0.2}}}


def test_random_routing_is_the_upper_hull_of_the_candidates():
    singles = [(1.0, 0.5), (2.0, 0.55), (3.0, 0.9)]  # the middle one lies below the chord: never worth it
    assert random_quality(singles, 2.0) == pytest.approx(0.7)
    assert random_quality(singles, 1.0) == pytest.approx(0.5)


def test_a_router_that_knows_the_answers_dominates_and_one_that_guesses_does_not():
    rng = np.random.default_rng(0)
    scores = np.stack([rng.random(200) < 0.5, np.ones(200)], axis=1).astype(float)
    costs = np.broadcast_to([1.0, 10.0], (200, 2))
    assert compare(scores, scores, costs)["dominates"]
    # Sure the cheap one is right exactly where it is wrong, and the dear one needed where it is not.
    wrong = np.stack([1 - scores[:, 0], scores[:, 0]], axis=1)
    backwards = compare(wrong, scores, costs)
    assert not backwards["dominates"] and backwards["min_gain"] < 0


@pytest.mark.slow
def test_curve_dominates_random_on_the_cached_graded_set():
    examples = load_jsonl(GRADED)
    router = train(examples, prices=PriceTable.parse(PRICES), holdout=0.4, seed=0)
    curve = router.report["heldout_curve"]
    assert curve["dominates"], curve["points"]
    assert curve["mean_gain"] > 0.02  # above random, not merely level with it at the two ends
