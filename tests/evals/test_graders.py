"""The graders on known cases: string checks, text similarity against its library, templates, checks
that name the field at fault, and the LLM judges over a scripted caller (both orders of a pairwise
judge kept; a disagreement is a tie)."""

from __future__ import annotations

import asyncio
import json

import pytest

from ember.errors import InvalidRequest
from ember.evals.criteria import check_criteria
from ember.evals.graders import Judge, grade
from ember.evals.template import render
from ember.server.platform import CallResult
from tests.evals.fake_caller import FakeCaller, fair_judge, first_judge

ITEM = {"question": "2+2?", "answer": "4", "meta": {"tags": ["math", "easy"]}}


def run(grader: dict, output: str, item=ITEM, judge=None):
    check_criteria([grader])
    return asyncio.run(grade(grader, item, {"output_text": output}, judge))


@pytest.mark.parametrize(
    "op,output,reference,want",
    [
        ("eq", "4", "4", 1.0),
        ("eq", "4 ", "4", 0.0),
        ("ne", "5", "4", 1.0),
        ("like", "it is 4.", "4", 1.0),
        ("like", "It Is Four", "four", 0.0),
        ("ilike", "It Is Four", "four", 1.0),
    ],
)
def test_string_check(op, output, reference, want):
    grader = {
        "type": "string_check",
        "name": "s",
        "operation": op,
        "input": "{{sample.output_text}}",
        "reference": reference,
    }
    got = run(grader, output)
    assert (got.score, got.passed) == (want, want == 1.0)


def test_templates_render_as_openai_does():
    spaces = {"item": ITEM, "sample": {"output_text": "4"}}
    assert render("Q: {{item.question}} A: {{ sample.output_text }}", spaces) == "Q: 2+2? A: 4"
    assert render("{{item.meta.tags.1}} {{item.meta}}", spaces) == 'easy {"tags": ["math", "easy"]}'
    with pytest.raises(InvalidRequest, match="item has no 'nope'"):
        render("{{item.nope}}", spaces)


def test_a_missing_template_variable_errors_the_grade_not_the_run():
    grader = {
        "type": "string_check",
        "name": "s",
        "operation": "eq",
        "input": "{{item.nope}}",
        "reference": "x",
    }
    got = run(grader, "x")
    assert got.score is None and not got.passed and "nope" in got.error


def test_text_similarity_matches_its_libraries():
    import sacrebleu
    from rapidfuzz import fuzz
    from rouge_score import rouge_scorer

    out, ref = "the cat sat on the mat", "the cat is on the mat"

    def sim(metric, threshold=0.5):
        g = {
            "type": "text_similarity",
            "name": "t",
            "evaluation_metric": metric,
            "input": out,
            "reference": ref,
        }
        return run({**g, "pass_threshold": threshold}, out)

    assert sim("fuzzy_match").score == pytest.approx(fuzz.ratio(out, ref) / 100)
    assert sim("bleu").score == pytest.approx(sacrebleu.sentence_bleu(out, [ref]).score / 100)
    rouge = rouge_scorer.RougeScorer(["rouge1", "rougeL"]).score(ref, out)
    assert sim("rouge_1").score == pytest.approx(rouge["rouge1"].fmeasure)
    assert sim("rouge_l").score == pytest.approx(rouge["rougeL"].fmeasure)
    assert 0 < sim("gleu").score < 1
    exact = sim("fuzzy_match", threshold=1.0)
    assert not exact.passed and sim("fuzzy_match", threshold=0.8).passed


@pytest.mark.parametrize(
    "grader,param",
    [
        ({"type": "nope", "name": "x"}, "testing_criteria[0].type"),
        (
            {"type": "string_check", "name": "x", "input": "a", "reference": "b", "operation": "gt"},
            "testing_criteria[0].operation",
        ),
        (
            {"type": "string_check", "name": "x", "input": 3, "reference": "b", "operation": "eq"},
            "testing_criteria[0].input",
        ),
        (
            {
                "type": "text_similarity",
                "name": "x",
                "input": "a",
                "reference": "b",
                "evaluation_metric": "meteor",
                "pass_threshold": 1,
            },
            "testing_criteria[0].evaluation_metric",
        ),
        (
            {
                "type": "text_similarity",
                "name": "x",
                "input": "a",
                "reference": "b",
                "evaluation_metric": "bleu",
            },
            "testing_criteria[0].pass_threshold",
        ),
        ({"type": "python", "name": "x", "source": "def grade(:"}, "testing_criteria[0].source"),
        ({"type": "python", "name": "x", "source": "", "timeout_s": 1e6}, "testing_criteria[0].timeout_s"),
        ({"type": "score_model", "name": "x", "model": "m", "input": []}, "testing_criteria[0].input"),
        (
            {
                "type": "score_model",
                "name": "x",
                "model": "m",
                "input": [{"role": "user", "content": "a"}],
                "range": [1, 0],
            },
            "testing_criteria[0].range",
        ),
        (
            {
                "type": "label_model",
                "name": "x",
                "model": "m",
                "input": [{"role": "user", "content": "a"}],
                "labels": ["a"],
                "passing_labels": ["b"],
            },
            "testing_criteria[0].passing_labels",
        ),
        ({"type": "pairwise_model", "name": "x"}, "testing_criteria[0].model"),
    ],
)
def test_a_bad_criterion_is_refused_naming_its_field(grader, param):
    with pytest.raises(InvalidRequest) as info:
        check_criteria([grader])
    assert info.value.param == param, str(info.value)


def test_two_criteria_of_one_name_are_refused():
    g = {"type": "string_check", "name": "x", "input": "a", "reference": "b", "operation": "eq"}
    with pytest.raises(InvalidRequest, match="used twice"):
        check_criteria([g, g])


def test_score_and_label_judges_ask_for_a_json_schema_and_read_it():
    caller = FakeCaller(
        {
            "judge": lambda messages, body: json.dumps(
                {"score": 7}
                if "score" in body["response_format"]["json_schema"]["name"]
                else {"label": "good"}
            )
        }
    )
    judge = Judge(caller, tenant="t1", priority=10)
    msgs = [
        {"role": "developer", "content": "Rate."},
        {"role": "user", "content": "Q {{item.question}} A {{sample.output_text}}"},
    ]
    score = run(
        {"type": "score_model", "name": "s", "model": "judge", "input": msgs, "range": [0, 5]},
        "4",
        judge=judge,
    )
    assert (score.score, score.passed) == (5.0, True)  # clamped to the range; passed at its midpoint
    path, body, tenant, priority = caller.calls[0]
    assert (path, tenant, priority) == ("/v1/chat/completions", "t1", 10)
    assert body["response_format"]["type"] == "json_schema" and body["temperature"] == 0.0
    assert body["messages"] == [
        {"role": "system", "content": "Rate."},
        {"role": "user", "content": "Q 2+2? A 4"},
    ]
    assert score.result()["sample"]["output"][0]["content"] == '{"score": 7}'
    label = {
        "type": "label_model",
        "name": "l",
        "model": "judge",
        "input": msgs,
        "labels": ["good", "bad"],
        "passing_labels": ["good"],
    }
    got = run(label, "4", judge=judge)
    assert (got.score, got.passed, got.result()["label"]) == (1.0, True, "good")


def test_a_failing_judge_errors_the_grade():
    judge = Judge(FakeCaller({}))
    msgs = [{"role": "user", "content": "x"}]
    got = run({"type": "score_model", "name": "s", "model": "gone", "input": msgs}, "4", judge=judge)
    assert got.score is None and "404" in got.error


PAIRWISE = {
    "type": "pairwise_model",
    "name": "p",
    "model": "judge",
    "prompt": "{{item.question}}",
    "reference": "{{item.answer}}",
}


def test_the_pairwise_judge_asks_both_orders_and_keeps_both():
    caller = FakeCaller({"judge": fair_judge(len)})  # the longer answer is better
    got = run(PAIRWISE, "four, that is 4", judge=Judge(caller))
    assert (got.score, got.passed) == (1.0, True)
    result = got.result()
    assert result["verdict"] == "sample"
    first, second = result["orderings"]
    assert (first["shown_as_a"], first["winner"], first["preferred"]) == ("sample", "A", "sample")
    assert (second["shown_as_a"], second["winner"], second["preferred"]) == ("reference", "B", "sample")
    shown = [c[1]["messages"][-1]["content"] for c in caller.calls]
    assert "Response A:\nfour, that is 4" in shown[0] and "Response A:\n4\n" in shown[1]
    assert "Task:\n2+2?" in shown[0]
    assert run(PAIRWISE, "", judge=Judge(caller)).score == 0.0


def test_a_judge_that_only_prefers_a_position_gives_a_tie():
    got = run(PAIRWISE, "four, that is 4", judge=Judge(FakeCaller({"judge": first_judge})))
    assert (got.score, got.passed, got.result()["verdict"]) == (0.5, False, "tie")
    assert [o["preferred"] for o in got.result()["orderings"]] == ["sample", "reference"]


def test_cosine_asks_the_embeddings_endpoint():
    class Embeddings:
        calls = []

        async def __call__(self, path, body, tenant, priority):
            self.calls.append((path, body))
            vectors = {"a b": [1.0, 0.0], "a c": [0.6, 0.8]}
            data = [{"index": i, "embedding": vectors[t]} for i, t in enumerate(body["input"])]
            return CallResult(200, {"object": "list", "data": data[::-1]})  # any order: by index

    caller = Embeddings()
    g = {
        "type": "text_similarity",
        "name": "c",
        "evaluation_metric": "cosine",
        "input": "a b",
        "reference": "a c",
        "pass_threshold": 0.5,
    }
    got = run(g, "", judge=Judge(caller))
    assert got.score == pytest.approx(0.6) and got.passed
    assert caller.calls[0] == (
        "/v1/embeddings",
        {"model": "all-minilm-l6-v2", "input": ["a b", "a c"], "encoding_format": "float"},
    )
