"""The learned router: training recovers a rule, the threshold trades cost monotonically, files round-trip,
bad examples are refused by line. Text features only (no embedding model) keeps these fast."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from typer.testing import CliRunner

from ember.router import Candidate, LearnedRouter, RouterError
from ember.router.examples import GradedExample, load_jsonl, write_jsonl
from ember.router.features import TEXT_FEATURES, FeatureConfig
from ember.router.model import Heads, route
from ember.router.train import train

TEXT_ONLY = FeatureConfig(embedding=None, text=True)


def separable(n: int = 200, seed: int = 0) -> list[GradedExample]:
    """The cheap candidate answers short inputs well and long ones badly; the dear one answers all."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.randint(1, 40)
        out.append(GradedExample(" ".join(["word"] * words), {"cheap": float(words < 20), "dear": 1.0}))
    return out


@pytest.fixture(scope="module")
def router() -> LearnedRouter:
    return train(separable(), costs={"dear": 10.0, "cheap": 1.0}, features=TEXT_ONLY)


def test_training_recovers_the_rule(router):
    assert router.candidates == ["cheap", "dear"]  # cheapest first, whatever order they were given in
    assert router.costs == {"cheap": 1.0, "dear": 10.0}
    assert router.report["candidates"]["cheap"]["heldout_auc"] > 0.95
    fresh = separable(100, seed=1)
    chosen = router.choose_many([ex.input for ex in fresh], 0.5)
    right = [c == ("cheap" if ex.scores["cheap"] else "dear") for c, ex in zip(chosen, fresh, strict=True)]
    assert np.mean(right) > 0.95
    assert router.report["heldout_curve"]["dominates"]


def test_threshold_is_monotone_in_cost(router):
    texts = [ex.input for ex in separable(60, seed=2)]
    costs = [np.mean([router.costs[c] for c in router.choose_many(texts, t)]) for t in np.linspace(0, 1, 21)]
    assert all(a <= b for a, b in zip(costs[:-1], costs[1:], strict=True))
    assert costs[0] == 1.0 < costs[-1]  # 0: all to the cheapest; 1: each to its best-predicted


def test_route_with_three_candidates():
    probs = np.array([[0.9, 0.95, 0.99], [0.2, 0.7, 0.9], [0.1, 0.2, 0.3]])
    assert route(probs, 0.5).tolist() == [0, 1, 2]
    assert route(probs, 0.0).tolist() == [0, 0, 0]
    assert route(probs, 1.0).tolist() == [2, 2, 2]  # none reaches 1: the best predicted
    assert route(np.array([[0.3, 0.6, 0.5]]), 0.9).tolist() == [1]  # not the dearest when it is worse
    with pytest.raises(RouterError, match="threshold must be in"):
        route(probs, 1.5)


def test_save_load_round_trip(router, tmp_path):
    router.save(tmp_path / "r")
    loaded = LearnedRouter.load(tmp_path / "r")
    texts = ["word " * 3, "word " * 30, ""]
    assert loaded.candidates == router.candidates and loaded.costs == router.costs
    assert loaded.predict(texts) == router.predict(texts)
    assert loaded.report == json.loads(json.dumps(router.report))
    assert loaded.features == TEXT_ONLY


def test_load_refuses_what_is_not_a_router(tmp_path):
    with pytest.raises(RouterError, match="router.json and weights.safetensors"):
        LearnedRouter.load(tmp_path)


def test_a_hand_built_router_needs_no_training():
    d = len(TEXT_FEATURES)
    heads = Heads(np.zeros(d), np.ones(d), np.zeros((2, d)), np.array([0.0, 2.0]))
    r = LearnedRouter([Candidate("cheap", 1.0), Candidate("dear", 5.0)], TEXT_ONLY, heads)
    assert r.predict(["hi"])[0] == pytest.approx({"cheap": 0.5, "dear": 1 / (1 + np.exp(-2))})
    assert r.choose("hi", 0.5) == "cheap" and r.choose("hi", 0.6) == "dear" and r.choose("hi", 1.0) == "dear"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not JSON"),
        ('{"input": 3, "scores": {"a": 1}}', "line 2: 'input' must be a string"),
        ('{"input": "x", "scores": {"a": 2}}', r"line 2: scores.a must be a number in \[0, 1\]"),
        ('{"input": "x", "scores": {}}', "line 2: 'scores' must be an object"),
        ('{"input": "x", "scores": {"a": 1}, "grade": 1}', "line 2: unknown field 'grade'"),
    ],
)
def test_bad_examples_file_names_the_line(tmp_path, line, message):
    path = tmp_path / "graded.jsonl"
    path.write_text('{"input": "fine", "scores": {"a": 1, "b": 0}}\n' + line + "\n")
    with pytest.raises(RouterError, match=f"{path.name} {message}"):
        load_jsonl(path)


def test_training_refuses_examples_missing_a_candidate():
    examples = separable(20)
    examples[4] = GradedExample("x", {"cheap": 1.0})
    with pytest.raises(RouterError, match="example 5 has no score for 'dear'"):
        train(examples, features=TEXT_ONLY, costs={"cheap": 1, "dear": 2})


def test_cli_trains_and_writes_the_report(tmp_path):
    from ember.cli import app

    write_jsonl(separable(80), tmp_path / "graded.jsonl")
    args = ["router", "train", "--examples", str(tmp_path / "graded.jsonl"), "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(app, [*args, "--candidates", "cheap=1,dear=10", "--embedding", "none"])
    assert result.exit_code == 0, result.output
    assert "dominates random routing" in result.output
    assert (tmp_path / "r" / "curve.png").stat().st_size > 0
    assert LearnedRouter.load(tmp_path / "r").candidates == ["cheap", "dear"]
    bad = CliRunner().invoke(app, [*args, "--embedding", "none"])  # no costs, no prices
    assert bad.exit_code == 2 and "give each candidate a cost" in bad.output


def test_examples_from_eval_runs_join_the_runs_on_their_items(tmp_path):
    from ember.router.examples import from_eval_runs
    from ember.store import evals as rows
    from ember.store.db import Store

    store = Store(f"sqlite:///{tmp_path / 'ember.db'}")
    items = [{"item": {"q": "2+2?"}}, {"item": {"q": "capital of France?"}}, {"item": {"q": "hi"}}]
    template = {"type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]}
    for model, statuses in (("small", ["pass", "fail", "error"]), ("large", ["pass", "pass", "pass"])):
        run = {
            "id": f"evalrun_{model}", "eval_id": "eval_1", "name": model, "model": model, "status": "completed",
            "data_source": {"type": "completions", "model": model, "input_messages": template},
            "testing_criteria": [], "created_at": 0,
        }  # fmt: skip
        rows.insert_run(store, run, items)
        for idx, status in enumerate(statuses):
            sample = {"usage": {"prompt_tokens": 5 + idx, "completion_tokens": 2}}
            rows.record(store, run["id"], idx, {"status": status, "results": [], "sample": sample}, {})
    examples = from_eval_runs(store, ["evalrun_small", "evalrun_large"])
    assert [(e.input, e.scores) for e in examples] == [
        ("2+2?", {"small": 1.0, "large": 1.0}),
        ("capital of France?", {"small": 0.0, "large": 1.0}),
    ]  # "hi" errored on small: not comparable, left out
    assert examples[1].usage["small"] == {"prompt_tokens": 6, "completion_tokens": 2}
    with pytest.raises(RouterError, match="no eval run 'evalrun_x'"):
        from_eval_runs(store, ["evalrun_x"])
