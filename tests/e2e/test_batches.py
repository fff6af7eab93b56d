"""The Batch API against `ember serve` on the default model, through the unmodified openai SDK: the round
trip, a batch with bad lines, and kill -9 mid-batch then a restart on the same --data-dir."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import MODEL, free_port, wait_until

pytestmark = pytest.mark.slow

SYSTEM = "You are a terse assistant. Answer in one short sentence. " * 4  # shared by every line: cached


def serve(data_dir: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    cmd += ["--embedding-model", "none", "--max-model-len", "512", "--kv-cache-memory", "128MiB"]
    log = open(data_dir / f"serve-{port}.log", "w")  # noqa: SIM115 - the server's, closed with it
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})


@contextlib.contextmanager
def server(data_dir: Path):
    port = free_port()
    proc = serve(data_dir, port)
    try:
        wait_until(f"http://127.0.0.1:{port}", timeout=300)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0), proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with server(tmp_path_factory.mktemp("batches")) as (c, _):
        yield c


def chat(custom_id: str, question: str, max_tokens: int = 12) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def submit(client, lines: list, endpoint: str = "/v1/chat/completions"):
    data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    f = client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")


def wait(client, batch_id: str, want=("completed", "failed", "expired", "cancelled"), timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in want:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} is still {batch.status}: {batch.request_counts}")


def lines_of(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).read().decode().splitlines()]


def test_the_sdk_round_trip_answers_every_custom_id_once(client):
    questions = [f"What is {i} plus {i}?" for i in range(8)]
    online = client.chat.completions.create(**chat("x", questions[3])["body"])  # caches SYSTEM's blocks
    batch = submit(client, [chat(f"q-{i}", q) for i, q in enumerate(questions)])
    done = wait(client, batch.id)
    assert done.status == "completed", done.errors
    assert done.request_counts.model_dump() == {"total": 8, "completed": 8, "failed": 0}
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    assert done.usage.input_tokens_details.cached_tokens > 0  # the shared system prompt
    out = lines_of(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"q-{i}" for i in range(8))
    for o in out:
        assert o["error"] is None and o["response"]["status_code"] == 200
        assert o["response"]["body"]["object"] == "chat.completion"
    # a batch line answers what the same request answers online (greedy)
    batched = next(o for o in out if o["custom_id"] == "q-3")["response"]["body"]
    assert batched["choices"][0]["message"]["content"] == online.choices[0].message.content


def test_a_batch_with_bad_lines_completes_with_an_error_file_naming_them(client):
    lines = [
        chat("good-1", "Name a color."),
        "{broken",
        {**chat("wrong-url", "Hi"), "url": "/v1/completions"},
        chat("good-1", "Duplicate id."),
        {**chat("no-such-model", "Hi"), "body": {**chat("x", "Hi")["body"], "model": "nope"}},
        chat("good-2", "Name a fruit."),
    ]
    done = wait(client, submit(client, lines).id)
    assert done.status == "completed"
    assert done.request_counts.model_dump() == {"total": 6, "completed": 2, "failed": 4}
    assert sorted(o["custom_id"] for o in lines_of(client, done.output_file_id)) == ["good-1", "good-2"]
    errors = lines_of(client, done.error_file_id)
    named = sorted((e["custom_id"] or f"line {e['error']['line']}") for e in errors)
    assert named == ["good-1", "line 2", "no-such-model", "wrong-url"]
    assert next(e for e in errors if e["custom_id"] == "no-such-model")["response"]["status_code"] == 404


def test_kill_9_mid_batch_then_restart_completes_every_custom_id_once(tmp_path):
    n = 16
    lines = [
        {
            "custom_id": f"c-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": f"Line {i}:", "max_tokens": 4 + 3 * i, "ignore_eos": True},
        }
        for i in range(n)
    ]
    with server(tmp_path) as (client, proc):
        batch = submit(client, lines, endpoint="/v1/completions")
        deadline = time.monotonic() + 300
        while (done := client.batches.retrieve(batch.id).request_counts.completed) < 3:
            assert time.monotonic() < deadline, "no line finished in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert done < n - 3, f"{done} of {n} lines were done at the kill: not mid-batch"
    with server(tmp_path) as (client, _):
        final = wait(client, batch.id)
        assert final.status == "completed", final.errors
        assert final.request_counts.model_dump() == {"total": n, "completed": n, "failed": 0}
        out = lines_of(client, final.output_file_id)
        ids = [o["custom_id"] for o in out]
        assert sorted(ids) == sorted(f"c-{i}" for i in range(n)) and len(set(ids)) == n
        for o in out:
            i = int(o["custom_id"].split("-")[1])
            assert o["response"]["body"]["usage"]["completion_tokens"] == 4 + 3 * i
