"""/v1/files and /v1/fine_tuning/jobs through the unmodified openai SDK, with jobs run by the real worker
process over the fast stand-ins of tests/tune/fake_tune.py: every status, the 4xx refusals, tenants."""

from __future__ import annotations

import contextlib
import io
import json
import time

import openai
import pytest
from starlette.testclient import TestClient

from ember.server.app import ServerState, create_app
from ember.server.tuning_api import Tuning
from tests.server.fakes import FakeEngine

MODEL = "smollm2-135m-instruct"
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4
FAKES = "tests.tune.fake_tune"


class TuneEngine(FakeEngine):
    config = None

    async def wait_ready(self) -> None:
        return None

    async def add_lora(self, name: str, path: str) -> None:
        self.adapters[name] = path


def jsonl(rows: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


@contextlib.contextmanager
def tuning_server(tmp_path, api_keys=(), admin=None, max_upload=1 << 16):
    engine = TuneEngine()
    state = ServerState(api_keys=list(api_keys), admin_key=admin)
    tuning = Tuning(
        tmp_path, f"sqlite:///{tmp_path}/ember.db", engine, MODEL, state.adapter_owners, max_upload
    )
    tuning.runner.trainer = tuning.runner.data = FAKES
    state.tuning = tuning
    with TestClient(create_app(engine, MODEL, state)) as http:
        yield http, engine, state


def sdk(http, key="none") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


def wait_status(client, job_id, want: set[str], timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in want:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} is {job.status}, not {want}")


def upload(client, rows, purpose="fine-tune", name="train.jsonl"):
    return client.files.create(file=(name, io.BytesIO(jsonl(rows))), purpose=purpose)


def test_a_job_goes_from_upload_to_served(tmp_path):
    with tuning_server(tmp_path) as (http, engine, state):
        client = sdk(http)
        f = upload(client, CHAT)
        assert (f.object, f.purpose, f.bytes, f.filename) == (
            "file",
            "fine-tune",
            len(jsonl(CHAT)),
            "train.jsonl",
        )
        assert client.files.retrieve(f.id).id == f.id
        assert client.files.content(f.id).read() == jsonl(CHAT)
        assert [x.id for x in client.files.list(purpose="fine-tune")] == [f.id]
        job = client.fine_tuning.jobs.create(
            model=MODEL,
            training_file=f.id,
            validation_file=f.id,
            suffix="greet",
            seed=7,
            metadata={"team": "a"},
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}},
            },
            extra_body={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "max_len": 64},
        )
        assert job.status == "validating_files" and job.fine_tuned_model is None and job.seed == 7
        assert job.method.supervised.hyperparameters.n_epochs == 2
        done = wait_status(client, job.id, {"succeeded", "failed"})
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model == f"ft:{MODEL}:greet:{job.id.removeprefix('ftjob-')}"
        assert done.trained_tokens == 40 and done.finished_at >= done.created_at
        assert done.fine_tuned_model in engine.adapters  # served at once, global (an open server)
        assert done.fine_tuned_model in [m.id for m in client.models.list()]
        assert state.adapter_owners == {}
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        metrics = [e for e in events if e.type == "metrics"]
        assert [e.data["step"] for e in metrics] == [4, 3, 2, 1]  # newest first, as OpenAI lists them
        assert {"train_loss", "valid_loss", "token_accuracy"} <= set(metrics[0].data)
        assert events[0].message == "The job has successfully completed"
        (ckpt,) = client.fine_tuning.jobs.checkpoints.list(job.id)
        assert ckpt.step_number == 4 and ckpt.metrics.train_loss == 0.5
        assert ckpt.fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-4"
        page = client.fine_tuning.jobs.list(metadata={"team": "a"})
        assert [j.id for j in page.data] == [job.id]
        assert client.fine_tuning.jobs.list(metadata={"team": "b"}).data == []
        with pytest.raises(openai.BadRequestError, match="succeeded already"):
            client.fine_tuning.jobs.cancel(job.id)
        assert client.files.delete(f.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(f.id)


@pytest.mark.parametrize(
    "rows, why",
    [
        ([CHAT[0], "{not json", CHAT[0]], "line 2: not valid JSON"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "supervised token"),
        ([{"input": {}, "preferred_output": [], "non_preferred_output": []}], "does not train on"),
    ],
)
def test_a_bad_file_fails_the_job_at_validation(tmp_path, rows, why):
    with tuning_server(tmp_path) as (http, engine, _):
        client = sdk(http)
        f = upload(client, rows)
        job = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
        done = wait_status(client, job.id, {"succeeded", "failed", "queued", "running"})
        assert done.status == "failed" and why in done.error.message
        assert done.error.param == "training_file"
        assert done.trained_tokens is None and not engine.adapters


def test_refusals_are_clear_4xx_and_the_server_keeps_serving(tmp_path):
    with tuning_server(tmp_path, max_upload=1024) as (http, _, _):
        client = sdk(http)
        good = upload(client, CHAT)
        batch = upload(client, CHAT, purpose="batch")
        create = client.fine_tuning.jobs.create
        cases = [
            (dict(method={"type": "reinforcement"}), openai.BadRequestError, "unknown method"),
            (dict(training_file=batch.id), openai.BadRequestError, "purpose 'batch'"),
            (dict(training_file="file-nothere"), openai.NotFoundError, "no file"),
            (dict(model="gpt-4o"), openai.NotFoundError, "cannot be fine-tuned"),
            (dict(hyperparameters={"n_epochs": 0}), openai.BadRequestError, "n_epochs must be"),
            (dict(hyperparameters={"batch_size": "big"}), openai.BadRequestError, "batch_size must be"),
            (dict(hyperparameters={"beta": 0.1}), openai.BadRequestError, "unknown hyperparameter"),
            (dict(extra_body={"lora": {"r": 0}}), openai.BadRequestError, "lora.r"),
            (dict(suffix="a b"), openai.BadRequestError, "suffix"),
        ]
        for change, error, why in cases:
            kw = {"model": MODEL, "training_file": good.id, **change}
            with pytest.raises(error, match=why):
                create(**kw)
        with pytest.raises(openai.BadRequestError, match="purpose must be"):
            upload(client, CHAT, purpose="nonsense")
        with pytest.raises(openai.APIStatusError, match="--max-upload-bytes") as big:
            client.files.create(file=("big.jsonl", io.BytesIO(b"x" * 4096)), purpose="fine-tune")
        assert big.value.status_code == 413
        assert client.fine_tuning.jobs.list().data == []
        assert [m.id for m in client.models.list()] == [MODEL]


def test_dpo_and_the_legacy_hyperparameters_are_taken(tmp_path):
    pairs = [{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [{"role": "assistant", "content": "a"}], "non_preferred_output": [{"role": "assistant", "content": "b"}]}] * 3  # fmt: skip
    with tuning_server(tmp_path) as (http, engine, _):
        client = sdk(http)
        f = upload(client, pairs)
        dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "learning_rate_multiplier": 0.5}}}
        job = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, method=dpo)
        assert job.method.dpo.hyperparameters.beta == 0.2
        assert wait_status(client, job.id, {"succeeded", "failed"}).status == "succeeded"
        sft = upload(client, CHAT)
        legacy = client.fine_tuning.jobs.create(
            model=MODEL, training_file=sft.id, hyperparameters={"n_epochs": 1}
        )
        assert legacy.hyperparameters.n_epochs == 1 and legacy.hyperparameters.batch_size == 8


def test_a_cancelled_job_stops_and_is_not_served(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.5")
    with tuning_server(tmp_path) as (http, engine, _):
        client = sdk(http)
        f = upload(client, CHAT * 10)
        job = client.fine_tuning.jobs.create(
            model=MODEL, training_file=f.id, hyperparameters={"batch_size": 1}
        )
        wait_status(client, job.id, {"running"})
        deadline = time.monotonic() + 30
        while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client.fine_tuning.jobs.retrieve(job.id).estimated_finish is not None
        cancelled = client.fine_tuning.jobs.cancel(job.id)
        assert cancelled.status == "cancelled" and cancelled.finished_at is not None
        deadline = time.monotonic() + 30
        while "Training stopped" not in [e.message for e in client.fine_tuning.jobs.list_events(job.id)]:
            assert time.monotonic() < deadline, "the worker did not stop"
            time.sleep(0.1)
        assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled" and not engine.adapters


def test_a_queued_job_can_be_cancelled_before_it_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.3")
    with tuning_server(tmp_path) as (http, _, _):
        client = sdk(http)
        f = upload(client, CHAT * 5)
        first = client.fine_tuning.jobs.create(
            model=MODEL, training_file=f.id, hyperparameters={"batch_size": 1}
        )
        second = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
        wait_status(client, first.id, {"running"})
        assert wait_status(client, second.id, {"queued"}).status == "queued"  # one at a time
        assert client.fine_tuning.jobs.cancel(second.id).status == "cancelled"
        client.fine_tuning.jobs.cancel(first.id)


def test_files_and_jobs_belong_to_their_key(tmp_path):
    with tuning_server(tmp_path, api_keys=["key-a", "key-b"], admin="root") as (http, engine, _):
        a, b, root = sdk(http, "key-a"), sdk(http, "key-b"), sdk(http, "root")
        f = upload(a, CHAT)
        for call in (b.files.retrieve, b.files.content, b.files.delete):
            with pytest.raises(openai.NotFoundError):
                call(f.id)
        assert list(b.files.list()) == [] and [x.id for x in a.files.list()] == [f.id]
        with pytest.raises(openai.PermissionDeniedError, match="admin key"):  # non-admin key
            a.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
        with pytest.raises(openai.NotFoundError):  # the admin's own files only
            root.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
        mine = upload(root, CHAT)
        job = root.fine_tuning.jobs.create(model=MODEL, training_file=mine.id)
        done = wait_status(root, job.id, {"succeeded", "failed"})
        assert done.status == "succeeded" and done.fine_tuned_model in [m.id for m in b.models.list()]
        with pytest.raises(openai.AuthenticationError):
            sdk(http, "wrong").files.list()
