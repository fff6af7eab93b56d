"""`ember serve --ray --replicas 2` end to end, through the official SDK: one server (Ray, two tiny engine
replicas of one torch thread each, an adapter, the embedding model) shared by every test here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest

from tests.e2e.conftest import MODEL, free_port, wait_until
from tests.lora.test_lora import _build

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'ember[ray]'")

pytestmark = pytest.mark.slow

REPLICA_TITLE = "ServeReplica:ember:engine"


@pytest.fixture(scope="session")
def ray_server(default_model_dir, tmp_path_factory):
    adapter = tmp_path_factory.mktemp("ray-adapter") / "qv4"
    _build(default_model_dir, adapter, 4, 8, ["q_proj", "v_proj"], False, seed=0)
    port = free_port()
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--ray", "--replicas", "2", "--port", str(port)]
    cmd += ["--lora", f"qv4={adapter}", "--kv-cache-memory", "64MiB", "--log-level", "warning"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(url, timeout=300)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)  # a drain: the app deleted, Ray stopped
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def client(ray_server):
    return openai.OpenAI(base_url=ray_server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def replica_pids(server: subprocess.Popen) -> list[int]:
    """The replicas of this server's own Ray (a descendant of its process), by their process title."""
    return sorted(
        p.pid
        for p in psutil.Process(server.pid).children(recursive=True)
        if REPLICA_TITLE in " ".join(p.cmdline())
    )


def test_chat_streaming_and_completions(client):
    kwargs = dict(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], temperature=0, max_tokens=16
    )
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == full.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    done = client.completions.create(
        model=MODEL, prompt=["The sky is", "Water is"], max_tokens=6, temperature=0
    )
    assert [c.index for c in done.choices] == [0, 1] and all(c.text for c in done.choices)


def test_tools(client):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_embeddings(client):
    r = client.embeddings.create(model="all-minilm-l6-v2", input=["a cat", "a dog"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 384


def test_adapter_is_served_by_the_replicas(client):
    assert "qv4" in {m.id for m in client.models.list()}
    base = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=0)
    tuned = client.completions.create(model="qv4", prompt="Once upon", max_tokens=8, temperature=0)
    assert tuned.model == "qv4" and tuned.usage.completion_tokens == 8
    assert tuned.choices[0].text != base.choices[0].text  # the adapter's weights did change the answer


def test_a_tenants_shared_prefix_is_served_from_cache(client):
    system = "You are a terse assistant for a bicycle shop. Answer in one line. " * 8
    cached = [
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}],
            max_tokens=2,
        ).usage.prompt_tokens_details.cached_tokens
        for i in range(4)
    ]
    assert all(c > 0 for c in cached[1:])  # routed to the replica holding the prefix, every time


def test_a_killed_replica_loses_no_request_and_is_replaced(ray_server, client):
    _, server = ray_server
    before = replica_pids(server)
    assert len(before) == 2

    def ask(i: int) -> str:
        r = client.completions.create(
            model=MODEL, prompt=f"Count {i}:", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        return r.choices[0].finish_reason

    def stream(i: int) -> str:
        try:
            chunks = list(
                client.completions.create(
                    model=MODEL,
                    prompt=f"Tale {i}:",
                    max_tokens=32,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
            )
        except openai.APIError as exc:  # the error event of a stream whose replica died
            return f"error: {exc}"
        return chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(12) as pool:
        asked = [pool.submit(ask, i) for i in range(12)]
        streams = [pool.submit(stream, i) for i in range(2)]
        time.sleep(1.5)
        os.kill(before[0], signal.SIGKILL)
        assert [f.result(timeout=120) for f in asked] == ["length"] * 12  # none lost
        ended = [f.result(timeout=120) for f in streams]  # each ends: done, or with an error event
    assert all(e == "length" or e.startswith("error") for e in ended)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(set(replica_pids(server)) - {before[0]}) < 2:
        time.sleep(1)
    after = replica_pids(server)
    assert before[0] not in after and len(after) == 2  # Ray started a new one
    for i in range(4):  # and traffic flows through the set again
        assert ask(100 + i) == "length"
