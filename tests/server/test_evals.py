"""/v1/evals through the unmodified openai SDK over a scripted chat engine: evals CRUD, jsonl and
completions runs with every grader kind the server runs, a pairwise judge's two orderings in the output
item, the bootstrap interval on the run, cancel, tenancy, bad input answered 400 naming the field, and a
run that survives its server stopping mid-run (a new app on the same store finishes it)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import time

import openai
import pytest
from starlette.testclient import TestClient

from ember.evals.compare import compare
from ember.server.app import ServerState, create_app
from ember.server.platform import BATCH_PRIORITY, Platform
from tests.evals.fake_caller import FakeCaller, fair_judge
from tests.evals.math_engine import MathEngine

MODEL = "fake-model"
KEYS = ["key-a", "key-b"]
ITEMS = [{"q": f"what is {i} + 1?", "a": str(i + 1)} for i in range(12)]
SCHEMA = {
    "type": "object",
    "properties": {"q": {"type": "string"}, "a": {"type": "string"}},
    "required": ["q", "a"],
}
EXACT = {
    "type": "string_check",
    "name": "exact",
    "operation": "eq",
    "input": "{{sample.output_text}}",
    "reference": "{{item.a}}",
}
TEMPLATE = {"type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]}


@contextlib.contextmanager
def eval_server(root, engine=None, embedder=None):
    platform = Platform.open(root, f"sqlite:///{root}/ember.db", 1 << 20)
    engine = engine or MathEngine()
    state = ServerState(api_keys=list(KEYS), platform=platform, embedder=embedder)
    app = create_app(engine, MODEL, state)
    with TestClient(app) as http:
        yield http, app, engine


def sdk(http, key="key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


def make_eval(client, criteria=(EXACT,), **kw):
    return client.evals.create(
        name="math",
        data_source_config={"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True},
        testing_criteria=list(criteria),
        **kw,
    )


def completions(items=ITEMS, model=MODEL) -> dict:
    return {
        "type": "completions",
        "model": model,
        "input_messages": TEMPLATE,
        "sampling_params": {"temperature": 0.0, "max_completion_tokens": 4},
        "source": {"type": "file_content", "content": [{"item": it} for it in items]},
    }


def wait(client, eval_id, run_id, *want, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status in want:
            return run
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} is {run.status} ({run.result_counts}), not {want}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with eval_server(tmp_path_factory.mktemp("evals")) as got:
        yield got


def test_evals_are_created_listed_updated_and_deleted(server):
    http, _, _ = server
    client = sdk(http)
    ev = make_eval(client, metadata={"team": "x"})
    assert (ev.object, ev.name, ev.metadata) == ("eval", "math", {"team": "x"})
    assert ev.data_source_config.type == "custom"
    assert ev.data_source_config.schema_["properties"]["item"] == SCHEMA
    assert ev.testing_criteria[0].name == "exact"
    assert client.evals.retrieve(ev.id).id == ev.id
    assert ev.id in [e.id for e in client.evals.list(limit=100)]
    assert client.evals.update(ev.id, name="renamed").name == "renamed"
    assert client.evals.retrieve(ev.id).metadata == {"team": "x"}
    deleted = client.evals.delete(ev.id)
    assert (deleted.deleted, deleted.eval_id) == (True, ev.id)
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(ev.id)


def test_a_completions_run_samples_grades_and_carries_an_interval(server):
    http, app, engine = server
    client = sdk(http)
    python = {
        "type": "python",
        "name": "numeric",
        "source": "def grade(sample, item):\n    return float(sample['output_text'].isdigit())",
        "pass_threshold": 1.0,
    }
    fuzzy = {
        "type": "text_similarity",
        "name": "fuzzy",
        "evaluation_metric": "fuzzy_match",
        "input": "{{sample.output_text}}",
        "reference": "{{item.a}}",
        "pass_threshold": 0.9,
    }
    ev = make_eval(client, [EXACT, python, fuzzy])
    engine.priorities.clear()
    run = client.evals.runs.create(ev.id, name="r1", data_source=completions(), metadata={"k": "v"})
    assert (run.object, run.status, run.model, run.metadata) == ("eval.run", "queued", MODEL, {"k": "v"})
    done = wait(client, ev.id, run.id, "completed")
    assert done.result_counts.model_dump() == {"total": 12, "passed": 6, "failed": 6, "errored": 0}
    per = {r.testing_criteria: r for r in done.per_testing_criteria_results}
    assert (per["exact"].passed, per["exact"].failed) == (6, 6)
    ci = per["exact"].model_extra["ember"]
    assert ci["mean"] == 0.5 and 0.1 < ci["ci_low"] < 0.5 < ci["ci_high"] < 0.9 and ci["n"] == 12
    assert done.per_model_usage[0].invocation_count == 12 and done.per_model_usage[0].model_name == MODEL
    assert set(engine.priorities) == {BATCH_PRIORITY}

    items = client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100)
    assert [i.datasource_item_id for i in items.data] == list(range(12))
    first = items.data[0]
    assert (first.status, first.datasource_item, first.sample.output[0].content) == ("pass", ITEMS[0], "1")
    assert [(r.name, r.score, r.passed) for r in first.results] == [
        ("exact", 1.0, True),
        ("numeric", 1.0, True),
        ("fuzzy", 1.0, True),
    ]
    assert first.sample.input[0].content == "what is 0 + 1?"
    failing = client.evals.runs.output_items.list(run.id, eval_id=ev.id, status="fail", limit=100)
    assert [i.datasource_item_id for i in failing.data] == [1, 3, 5, 7, 9, 11]
    got = client.evals.runs.output_items.retrieve(first.id, eval_id=ev.id, run_id=run.id)
    assert got.id == first.id
    assert [r.id for r in client.evals.runs.list(ev.id)] == [run.id]
    assert client.evals.runs.list(ev.id, status="failed").data == []


def test_a_jsonl_run_from_a_file_grades_the_samples_given(server):
    http, _, _ = server
    client = sdk(http)
    ev = make_eval(client)
    lines = [
        {"item": it, "sample": {"output_text": it["a"] if i < 3 else "no"}} for i, it in enumerate(ITEMS[:5])
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    file = client.files.create(file=("items.jsonl", io.BytesIO(data)), purpose="evals")
    run = client.evals.runs.create(
        ev.id, data_source={"type": "jsonl", "source": {"type": "file_id", "id": file.id}}
    )
    done = wait(client, ev.id, run.id, "completed")
    assert done.result_counts.model_dump() == {"total": 5, "passed": 3, "failed": 2, "errored": 0}
    assert done.per_model_usage == [] and done.model is None


def test_a_pairwise_run_stores_both_orderings(server):
    http, app, _ = server
    client = sdk(http)
    real = app.state.platform.call
    judge = FakeCaller({"judge": fair_judge(lambda t: t != "?")})

    async def scripted(path, body, tenant, priority):  # the judge is scripted; the model is the engine
        return await (judge if body["model"] == "judge" else real)(path, body, tenant, priority)

    app.state.platform.call = scripted
    try:
        pair = {
            "type": "pairwise_model",
            "name": "vs_ref",
            "model": "judge",
            "prompt": "{{item.q}}",
            "reference": "{{item.a}}",
            "pass_threshold": 0.5,
        }
        ev = make_eval(client, [pair])
        run = client.evals.runs.create(ev.id, data_source=completions(ITEMS[:4]))
        done = wait(client, ev.id, run.id, "completed")
    finally:
        app.state.platform.call = real
    items = client.evals.runs.output_items.list(run.id, eval_id=ev.id).data
    even, odd = items[0].results[0], items[1].results[0]
    assert (even.score, even.passed, even.model_extra["verdict"]) == (0.5, True, "tie")  # the same answer
    assert (odd.score, odd.passed, odd.model_extra["verdict"]) == (0.0, False, "reference")
    orderings = odd.model_extra["orderings"]
    assert [(o["shown_as_a"], o["shown_as_b"]) for o in orderings] == [
        ("sample", "reference"),
        ("reference", "sample"),
    ]
    assert [o["winner"] for o in orderings] == ["B", "A"] and all(
        o["preferred"] == "reference" for o in orderings
    )
    assert "Response A:\n?" in orderings[0]["sample"]["input"][1]["content"]
    assert "Response A:\n2" in orderings[1]["sample"]["input"][1]["content"]
    assert {c[2] for c in judge.calls} == {app.state.platform.state.tenant("key-a")} and {
        c[3] for c in judge.calls
    } == {BATCH_PRIORITY}
    assert done.per_testing_criteria_results[0].model_extra["ember"]["mean"] == 0.25


def test_an_unknown_model_fails_the_run_with_its_reason(server):
    http, _, _ = server
    client = sdk(http)
    ev = make_eval(client)
    run = client.evals.runs.create(ev.id, data_source=completions(ITEMS[:2], model="nope"))
    done = wait(client, ev.id, run.id, "failed")
    assert done.result_counts.errored == 2 and "nope" in done.error.message
    item = client.evals.runs.output_items.list(run.id, eval_id=ev.id).data[0]
    assert item.status == "error" and item.sample.error.message


@pytest.mark.parametrize(
    "change,param",
    [
        ({"data_source_config": {"type": "logs"}}, "data_source_config.type"),
        (
            {"data_source_config": {"type": "custom", "item_schema": {"type": 5}}},
            "data_source_config.item_schema",
        ),
        ({"testing_criteria": [{**EXACT, "operation": "gt"}]}, "testing_criteria[0].operation"),
        ({"testing_criteria": []}, "testing_criteria"),
        (
            {"testing_criteria": [{"type": "pairwise_model", "name": "p", "model": "judge"}]},
            "testing_criteria[0].reference",
        ),
        (
            {
                "testing_criteria": [
                    {**EXACT, "type": "text_similarity", "evaluation_metric": "meteor", "pass_threshold": 1}
                ]
            },
            "testing_criteria[0].evaluation_metric",
        ),
    ],
)
def test_a_bad_eval_is_refused_naming_the_field(server, change, param):
    client = sdk(server[0])
    body = {
        "name": "x",
        "data_source_config": {"type": "custom", "item_schema": SCHEMA},
        "testing_criteria": [EXACT],
        **change,
    }
    with pytest.raises(openai.BadRequestError) as info:
        client.evals.create(**body)
    assert info.value.param == param, info.value.message


@pytest.mark.parametrize(
    "source,param",
    [
        ({"type": "responses", "source": {"type": "responses"}}, "data_source.type"),
        ({**completions(), "model": None}, "data_source.model"),
        (
            {**completions(), "input_messages": {"type": "template", "template": []}},
            "data_source.input_messages.template",
        ),
        ({**completions(), "sampling_params": {"temprature": 0}}, "data_source.sampling_params.temprature"),
        ({"type": "jsonl", "source": {"type": "stored_completions"}}, "data_source.source.type"),
        (
            {"type": "jsonl", "source": {"type": "file_content", "content": [{"item": {"q": "x"}}]}},
            "data_source.source.content[0]",
        ),
        ({"type": "jsonl", "source": {"type": "file_content", "content": []}}, "data_source.source"),
        ({"type": "jsonl", "source": {"type": "file_id", "id": "file-nope"}}, "data_source.source.id"),
    ],
)
def test_a_bad_run_is_refused_naming_the_field(server, source, param):
    client = sdk(server[0])
    ev = make_eval(client)
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as info:
        client.evals.runs.create(ev.id, data_source=source)
    assert info.value.param == param, info.value.message


def test_another_key_reaches_none_of_an_evals_objects(server):
    http, _, _ = server
    a, b = sdk(http, "key-a"), sdk(http, "key-b")
    ev = make_eval(a)
    run = a.evals.runs.create(ev.id, data_source=completions(ITEMS[:2]))
    wait(a, ev.id, run.id, "completed")
    item = a.evals.runs.output_items.list(run.id, eval_id=ev.id).data[0]
    assert ev.id not in [e.id for e in b.evals.list(limit=100)]
    for attempt in (
        lambda: b.evals.retrieve(ev.id),
        lambda: b.evals.update(ev.id, name="mine"),
        lambda: b.evals.delete(ev.id),
        lambda: b.evals.runs.list(ev.id),
        lambda: b.evals.runs.retrieve(run.id, eval_id=ev.id),
        lambda: b.evals.runs.create(ev.id, data_source=completions(ITEMS[:1])),
        lambda: b.evals.runs.cancel(run.id, eval_id=ev.id),
        lambda: b.evals.runs.delete(run.id, eval_id=ev.id),
        lambda: b.evals.runs.output_items.list(run.id, eval_id=ev.id),
        lambda: b.evals.runs.output_items.retrieve(item.id, eval_id=ev.id, run_id=run.id),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    mine = make_eval(b)  # nor may a key name another key's run under its own eval, or its file
    with pytest.raises(openai.NotFoundError):
        b.evals.runs.retrieve(run.id, eval_id=mine.id)
    file = a.files.create(file=("x.jsonl", io.BytesIO(b'{"item": {"q": "a", "a": "b"}}\n')), purpose="evals")
    with pytest.raises(openai.NotFoundError):
        b.evals.runs.create(
            mine.id, data_source={"type": "jsonl", "source": {"type": "file_id", "id": file.id}}
        )
    assert a.evals.retrieve(ev.id).name == "math"


def test_a_run_is_canceled_and_deleted(tmp_path):
    engine = MathEngine(hold=0)  # nothing is answered until `held` is set
    with eval_server(tmp_path, engine) as (http, _, _):
        client = sdk(http)
        ev = make_eval(client)
        run = client.evals.runs.create(ev.id, data_source=completions(ITEMS[:3]))
        wait(client, ev.id, run.id, "in_progress")
        assert client.evals.runs.cancel(run.id, eval_id=ev.id).status == "canceled"
        engine.held.set()
        time.sleep(0.3)
        canceled = client.evals.runs.retrieve(run.id, eval_id=ev.id)
        assert canceled.status == "canceled"
        assert canceled.result_counts.model_dump() == {"total": 3, "passed": 0, "failed": 0, "errored": 0}
        finished = client.evals.runs.create(ev.id, data_source=completions(ITEMS[:1]))
        wait(client, ev.id, finished.id, "completed")
        with pytest.raises(openai.ConflictError):
            client.evals.runs.cancel(finished.id, eval_id=ev.id)
        assert client.evals.runs.delete(run.id, eval_id=ev.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.evals.runs.retrieve(run.id, eval_id=ev.id)


def test_an_acknowledged_run_survives_a_restart_and_completes_after_it(tmp_path):
    with eval_server(tmp_path, MathEngine(hold=6)) as (http, _, _):
        client = sdk(http)
        ev = make_eval(client)
        run = client.evals.runs.create(ev.id, data_source=completions())
        deadline = time.monotonic() + 20
        while (
            client.evals.runs.retrieve(run.id, eval_id=ev.id).result_counts.passed
            + client.evals.runs.retrieve(run.id, eval_id=ev.id).result_counts.failed
            < 6
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        before = {
            i.datasource_item_id: (i.id, i.created_at)
            for i in client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100)
        }
        assert sorted(before) == list(range(6))
    # the server stopped with items 6.. unanswered; a new one on the same store finishes the run
    with eval_server(tmp_path) as (http, _, engine):
        client = sdk(http)
        done = wait(client, ev.id, run.id, "completed")
        assert done.result_counts.model_dump() == {"total": 12, "passed": 6, "failed": 6, "errored": 0}
        after = {
            i.datasource_item_id: (i.id, i.created_at)
            for i in client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100)
        }
        assert sorted(after) == list(range(12)) and {k: after[k] for k in before} == before
        assert len(engine.priorities) == 6  # only the items left were sampled again


def graded(client, eval_id, run_id) -> int:
    counts = client.evals.runs.retrieve(run_id, eval_id=eval_id).result_counts
    return counts.passed + counts.failed + counts.errored


def test_compare_runs_through_the_servers_own_call(server):
    """The flywheel's path: compare() with PlatformContext.call, on the app's event loop."""
    http, app, engine = server
    ctx = app.state.platform
    tenant = ctx.state.tenant("key-a")
    engine.priorities.clear()
    run = functools.partial(compare, ctx.call, ITEMS, [EXACT], TEMPLATE, MODEL, "tuned", tenant=tenant)
    got = http.portal.call(run)
    exact = got.criterion("exact")
    assert (exact.mean_a, exact.mean_b, exact.diff, exact.n) == (0.5, 1.0, 0.5, 12) and exact.improved
    assert set(engine.priorities) == {BATCH_PRIORITY} and len(engine.priorities) == 24


def test_cosine_similarity_embeds_through_the_servers_embeddings(tmp_path, small_state):
    with eval_server(tmp_path, embedder=small_state.embedder) as (http, _, _):
        client = sdk(http)
        cosine = {
            "type": "text_similarity",
            "name": "cos",
            "evaluation_metric": "cosine",
            "input": "{{sample.output_text}}",
            "reference": "{{item.a}}",
            "pass_threshold": 0.8,
        }
        ev = client.evals.create(
            name="cos",
            data_source_config={"type": "custom", "item_schema": {"type": "object"}},
            testing_criteria=[cosine],
        )
        lines = [
            {
                "item": {"a": "The capital of France is Paris."},
                "sample": {"output_text": "Paris is the capital of France."},
            },
            {
                "item": {"a": "The capital of France is Paris."},
                "sample": {"output_text": "Bananas are rich in potassium."},
            },
        ]
        run = client.evals.runs.create(
            ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": lines}}
        )
        wait(client, ev.id, run.id, "completed")
        near, far = (i.results[0] for i in client.evals.runs.output_items.list(run.id, eval_id=ev.id).data)
    assert near.passed and near.score > 0.9 and not far.passed and far.score < 0.3
