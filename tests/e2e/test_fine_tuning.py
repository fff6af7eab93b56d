"""The SDK round trip: upload, fine-tune the default model with the real trainer (a few steps), list,
events, checkpoints, cancel, then chat with the fine-tuned model, all through the unmodified openai SDK
against `ember serve` itself."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys

import openai
import pytest

from tests.e2e.conftest import MODEL, free_port, wait_until
from tests.server.test_tuning import wait_status

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("ember.tune.data") is None
        or importlib.util.find_spec("ember.tune.trainer") is None,
        reason="needs ember.tune.data and ember.tune.trainer",
    ),
]

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Say the number {i}."},
            {"role": "assistant", "content": f"{i}"},
        ]
    }
    for i in range(8)
]


@pytest.fixture
def served(tmp_path):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "ember.cli",
        "serve",
        "--port",
        str(port),
        "--fine-tuning",
        "--data-dir",
        str(tmp_path),
    ]
    cmd += ["--embedding-model", "none", "--max-model-len", "512"]
    proc = subprocess.Popen(cmd, env={**os.environ})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(url, timeout=300)
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_the_sdk_round_trip(served):
    client = served
    data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    f = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=f.id,
        suffix="numbers",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
        extra_body={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "max_len": 64},
    )
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert job.id in [j.id for j in client.fine_tuning.jobs.list()]
    done = wait_status(client, job.id, {"succeeded", "failed", "cancelled"}, timeout=600)
    assert done.status == "succeeded", done.error
    metrics = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert len(metrics) == 2 and all("train_loss" in e.data for e in metrics)
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)] == [2]
    answer = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Say the number 3."}], max_tokens=4
    )
    assert answer.model == done.fine_tuned_model and answer.choices[0].message.content is not None
    other = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
    assert client.fine_tuning.jobs.cancel(other.id).status == "cancelled"
