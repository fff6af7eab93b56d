"""A server killed (SIGKILL) while a job trains: started again, the running job is failed with a message
that says why, the finished job and its served adapter are still there, and a queued job runs."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys

import openai

from tests.e2e.conftest import free_port, wait_until
from tests.server.test_tuning import CHAT, MODEL, jsonl, wait_status


@contextlib.contextmanager
def server(data_dir, env):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.tune.fake_server", str(data_dir), str(port)], env=env
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(url, "/health", timeout=60)
        yield proc, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_restart_fails_the_running_job_and_keeps_the_rest(tmp_path):
    env = {**os.environ, "FAKE_STEP_S": "0"}
    with server(tmp_path, env) as (_, client):
        f = client.files.create(file=("t.jsonl", io.BytesIO(jsonl(CHAT))), purpose="fine-tune")
        done = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
        assert wait_status(client, done.id, {"succeeded", "failed"}).status == "succeeded"
    env["FAKE_STEP_S"] = "1"
    with server(tmp_path, env) as (proc, client):
        slow = client.fine_tuning.jobs.create(
            model=MODEL, training_file=f.id, hyperparameters={"batch_size": 1}
        )
        queued = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id)
        wait_status(client, slow.id, {"running"})
        wait_status(client, queued.id, {"queued"})
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    env["FAKE_STEP_S"] = "0"
    with server(tmp_path, env) as (_, client):
        failed = wait_status(client, slow.id, {"failed", "succeeded", "cancelled"}, timeout=30)
        assert failed.status == "failed" and "server restarted" in failed.error.message
        kept = client.fine_tuning.jobs.retrieve(done.id)
        assert kept.status == "succeeded" and kept.fine_tuned_model in [m.id for m in client.models.list()]
        assert wait_status(client, queued.id, {"succeeded", "failed"}).status == "succeeded"
