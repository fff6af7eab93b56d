"""/v1/batches through the unmodified openai SDK over FakeEngine: validation, every status, cancel,
expiry, tenancy, and resuming after the runner stopped mid-batch (a new app on the same store)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time

import openai
import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from ember.batch import runner
from ember.server.app import ServerState, create_app
from ember.server.platform import BATCH_PRIORITY, Platform
from ember.store import batches as rows
from tests.server.fake_engine import FakeEngine

MODEL = "fake-model"
KEYS = ["key-a", "key-b"]
HELD = 99  # a completions line whose prompt starts with this token waits until the engine lets it go


class HoldEngine(FakeEngine):
    """FakeEngine that holds the requests whose prompt starts with HELD until `release` is set, and
    counts the prompts it was given."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.prompts: list[list[int]] = []
        self.kwargs: list[dict] = []

    async def generate(self, prompt, params, request_id=None, **kw):
        if params.max_tokens != 1:  # not the runner's prefix warm-up
            self.prompts.append(list(prompt))
        self.kwargs.append(kw)
        while prompt and prompt[0] == HELD and not self.release.is_set():
            await asyncio.sleep(0.005)
        async for out in super().generate(prompt, params, request_id, **kw):
            yield out


@contextlib.contextmanager
def batch_server(tmp_path, engine=None, keys=KEYS):
    platform = Platform.open(tmp_path, f"sqlite:///{tmp_path}/ember.db", 1 << 20)
    engine = engine or HoldEngine()
    app = create_app(engine, MODEL, ServerState(api_keys=list(keys), platform=platform))
    with TestClient(app) as http:
        yield http, app, engine


def sdk(http, key="key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


def line(custom_id, prompt=(1, 2), url="/v1/completions", **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": MODEL, "prompt": list(prompt), **body},
    }


def upload(client, lines: list) -> str:
    data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    return client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id


def submit(client, lines: list, endpoint="/v1/completions"):
    return client.batches.create(
        input_file_id=upload(client, lines), endpoint=endpoint, completion_window="24h"
    )


def wait(client, batch_id: str, *want: str, timeout=20.0, until=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in want and (until is None or until(batch)):
            return batch
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} is {batch.status} ({batch.request_counts}), not {want}")


def jsonl_of(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).read().decode().splitlines()]


def test_a_batch_runs_every_line_once_and_reports_in_openais_shape(tmp_path):
    with batch_server(tmp_path) as (http, app, engine):
        client = sdk(http)
        calls = []
        real = app.state.platform.call

        async def spy(path, body, tenant, priority):
            calls.append((path, tenant, priority))
            return await real(path, body, tenant, priority)

        app.state.platform.call = spy
        batch = submit(client, [line(f"req-{i}", max_tokens=2) for i in range(20)])
        assert (batch.status, batch.endpoint, batch.completion_window) == (
            "validating",
            "/v1/completions",
            "24h",
        )
        assert batch.expires_at == batch.created_at + 24 * 3600
        done = wait(client, batch.id, "completed")
        assert done.request_counts.model_dump() == {"total": 20, "completed": 20, "failed": 0}
        assert done.in_progress_at and done.finalizing_at and done.completed_at and done.error_file_id is None
        assert done.model == MODEL
        assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.total_tokens) == (20, 40, 60)
        out = jsonl_of(client, done.output_file_id)
        assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(20))
        first = out[0]
        assert first["error"] is None and first["id"].startswith("batch_req-")
        assert first["response"]["status_code"] == 200 and first["response"]["request_id"]
        assert first["response"]["body"]["object"] == "text_completion"
        assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
        tenant = app.state.ember.tenant("key-a")
        assert set(calls) == {("/v1/completions", tenant, BATCH_PRIORITY)}
        assert len(calls) == 20 and len(engine.prompts) == 20


def test_bad_lines_go_to_the_error_file_and_the_rest_run(tmp_path):
    with batch_server(tmp_path) as (http, _, _):
        client = sdk(http)
        bad = [
            "{not json",
            {"method": "POST", "url": "/v1/completions", "body": {"model": MODEL, "prompt": [1]}},
            line("dup"),
            {"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"model": MODEL}},
            line("elsewhere", url="/v1/chat/completions"),
            {"custom_id": "no-model", "method": "POST", "url": "/v1/completions", "body": {"prompt": [1]}},
            {**line("extra"), "headers": {}},
            line("unknown-model", model="nope"),  # valid as a line; the endpoint answers 404
            line("bad-field", bogus=1),  # the endpoint answers 400
        ]
        done = wait(client, submit(client, [line("ok-1"), *bad, line("dup"), line("ok-2")]).id, "completed")
        assert done.request_counts.model_dump() == {"total": 12, "completed": 3, "failed": 9}
        out = jsonl_of(client, done.output_file_id)
        assert sorted(o["custom_id"] for o in out) == ["dup", "ok-1", "ok-2"]
        errors = jsonl_of(client, done.error_file_id)
        by_code = {
            (e["error"] or {}).get("code") or e["response"]["body"]["error"]["code"]: e for e in errors
        }
        assert set(by_code) == {
            "invalid_json",
            "missing_custom_id",
            "invalid_method",
            "invalid_url",
            "missing_model",
            "unknown_parameter",
            "model_not_found",
            "duplicate_custom_id",
        }
        assert len(errors) == 9
        assert by_code["invalid_json"]["error"]["line"] == 2 and by_code["invalid_json"]["custom_id"] is None
        assert by_code["duplicate_custom_id"]["custom_id"] == "dup"
        assert "line 4" in by_code["duplicate_custom_id"]["error"]["message"]
        assert by_code["model_not_found"]["response"]["status_code"] == 404
        assert by_code["invalid_url"]["custom_id"] == "elsewhere"
        ran = [e for e in errors if e["response"] is not None]
        assert sorted(e["custom_id"] for e in ran) == ["bad-field", "unknown-model"]


def test_a_file_with_no_valid_line_fails_the_batch(tmp_path):
    with batch_server(tmp_path) as (http, _, engine):
        client = sdk(http)
        done = wait(client, submit(client, ["[]", line("x", url="/v1/embeddings")]).id, "failed")
        assert done.failed_at and done.output_file_id is None
        assert [(e.code, e.line) for e in done.errors.data] == [("invalid_request", 1), ("invalid_url", 2)]
        assert engine.prompts == []


def test_create_refuses_what_cannot_run(tmp_path):
    with batch_server(tmp_path) as (http, _, _):
        a, b = sdk(http, "key-a"), sdk(http, "key-b")
        file_id = upload(a, [line("x")])
        tuned = a.files.create(file=("t.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune").id

        def refused(client, **kw):
            args = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h", **kw}
            with pytest.raises(openai.APIStatusError) as err:
                client.batches.create(**args)
            return err.value.status_code, err.value.body.get("param")

        assert refused(a, endpoint="/v1/moderations") == (400, "endpoint")
        assert refused(a, completion_window="1h") == (400, "completion_window")
        assert refused(a, input_file_id=tuned) == (400, "input_file_id")
        assert refused(a, input_file_id="file-nope") == (404, "input_file_id")
        assert refused(b) == (404, "input_file_id")  # another key's file does not exist for b
        assert refused(a, extra_body={"bogus": 1})[0] == 400


def test_another_keys_batch_does_not_exist(tmp_path):
    with batch_server(tmp_path) as (http, _, _):
        a, b = sdk(http, "key-a"), sdk(http, "key-b")
        batch = submit(a, [line("x")])
        wait(a, batch.id, "completed")
        for call in (b.batches.retrieve, b.batches.cancel):
            with pytest.raises(openai.NotFoundError):
                call(batch.id)
        assert [x.id for x in b.batches.list()] == []
        with pytest.raises(openai.NotFoundError):
            b.files.content(a.batches.retrieve(batch.id).output_file_id)
        with pytest.raises(openai.AuthenticationError):
            sdk(http, "wrong").batches.list()


def test_listing_pages_newest_first(tmp_path):
    with batch_server(tmp_path) as (http, _, _):
        client = sdk(http)
        ids = [submit(client, [line("x")]).id for _ in range(5)]
        page = client.batches.list(limit=2)
        assert [x.id for x in page.data] == ids[::-1][:2] and page.has_more
        rest = client.batches.list(limit=10, after=page.data[-1].id)
        assert [x.id for x in rest.data] == ids[::-1][2:] and not rest.has_more
        assert [x.id for x in client.batches.list(limit=2)] == ids[::-1]


def test_cancel_stops_the_lines_and_files_what_ran(tmp_path):
    with batch_server(tmp_path) as (http, _, engine):
        client = sdk(http)
        lines = [line(f"fast-{i}") for i in range(3)] + [line(f"held-{i}", prompt=(HELD,)) for i in range(4)]
        batch = submit(client, lines)
        wait(client, batch.id, "in_progress", until=lambda b: b.request_counts.completed == 3)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        done = wait(client, batch.id, "cancelled")
        assert done.cancelled_at and done.request_counts.completed == 3
        assert sorted(o["custom_id"] for o in jsonl_of(client, done.output_file_id)) == [
            f"fast-{i}" for i in range(3)
        ]
        errors = jsonl_of(client, done.error_file_id)
        assert sorted(e["custom_id"] for e in errors) == [f"held-{i}" for i in range(4)]
        assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
        assert client.batches.cancel(batch.id).status == "cancelled"  # again: the same answer
        finished = submit(client, [line("x")])
        wait(client, finished.id, "completed")
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(finished.id)


def test_a_restart_resumes_the_batch_and_skips_what_was_done(tmp_path):
    lines = [line(f"fast-{i}") for i in range(5)] + [line(f"held-{i}", prompt=(HELD, i)) for i in range(6)]
    with batch_server(tmp_path) as (http, _, first):
        client = sdk(http)
        batch = submit(client, lines)
        wait(client, batch.id, "in_progress", until=lambda b: b.request_counts.completed == 5)
    # the app stopped with 6 lines in flight: nothing of them was recorded
    second = HoldEngine()
    second.release.set()
    with batch_server(tmp_path, second) as (http, _, _):
        client = sdk(http)
        done = wait(client, batch.id, "completed")
        assert done.request_counts.model_dump() == {"total": 11, "completed": 11, "failed": 0}
        out = jsonl_of(client, done.output_file_id)
        assert sorted(o["custom_id"] for o in out) == sorted(x["custom_id"] for x in lines)
        assert sorted(second.prompts) == [[HELD, i] for i in range(6)]  # the done lines did not run again


def test_a_batch_past_its_window_expires_with_the_unrun_lines_in_the_error_file(tmp_path):
    lines = [line("fast")] + [line(f"held-{i}", prompt=(HELD, i)) for i in range(3)]
    with batch_server(tmp_path) as (http, app, _):
        client = sdk(http)
        batch = submit(client, lines)
        wait(client, batch.id, "in_progress", until=lambda b: b.request_counts.completed == 1)
        store = app.state.platform.platform.store
    with store.tx() as conn:  # the 24h went by while the server was down
        conn.execute(sa.update(rows.batches).where(rows.batches.c.id == batch.id).values(expires_at=1))
    with batch_server(tmp_path) as (http, _, engine):
        client = sdk(http)
        done = wait(client, batch.id, "expired")
        assert done.expired_at and engine.prompts == []
        assert [o["custom_id"] for o in jsonl_of(client, done.output_file_id)] == ["fast"]
        errors = jsonl_of(client, done.error_file_id)
        assert sorted(e["custom_id"] for e in errors) == [f"held-{i}" for i in range(3)]
        assert {e["error"]["code"] for e in errors} == {"batch_expired"}


def test_a_cancel_while_the_shared_prefix_warms_up_stops_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "shares_prefix", lambda *_: True)
    with batch_server(tmp_path) as (http, _, engine):
        client = sdk(http)
        batch = submit(client, [line(f"held-{i}", prompt=(HELD, i)) for i in range(5)])
        wait(client, batch.id, "in_progress")
        client.batches.cancel(batch.id)
        done = wait(client, batch.id, "cancelled")
        assert done.output_file_id is None and engine.prompts == []
        assert len(jsonl_of(client, done.error_file_id)) == 5
