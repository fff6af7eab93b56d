"""Stored chat completions through the unmodified OpenAI SDK, over a chat-capable fake engine: capture
(plain and streamed), list by metadata and model, retrieve, messages, update, delete, feedback; and one
key never reaching another's traces."""

from __future__ import annotations

import httpx
import openai
import pytest

from ember.server.app import ServerState
from ember.server.platform import Platform
from tests.e2e.conftest import running_server
from tests.traces.fake_chat import PIECES, ChatEngine

MODEL = "smollm2-135m-instruct"  # running_server serves the engine under this name
KEYS = ["key-a", "key-b"]
ADMIN = "admin"
USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Mail me: ann@example.org"}]
STORED = "Write to [REDACTED:email] today."  # the fake's answer, as the trace keeps it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    platform = Platform.open(root, f"sqlite:///{root}/ember.db", 1 << 20)
    state = ServerState(api_keys=list(KEYS), admin_key=ADMIN, platform=platform)
    with running_server(ChatEngine({"tuned": "/adapters/tuned"}), state) as url:
        yield url, state


def client(server, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0)


def create(server, key: str = "key-a", **kw):
    return client(server, key).chat.completions.create(
        **{"model": MODEL, "messages": USER, "max_tokens": 4, **kw}
    )


def test_the_sdk_lists_retrieves_updates_and_deletes_stored_completions(server):
    sdk = client(server)
    x1 = create(server, store=True, metadata={"task": "x", "run": "sdk"})
    y = create(server, store=True, metadata={"task": "y", "run": "sdk"})
    x2 = create(server, store=True, metadata={"task": "x", "run": "sdk"}, model="tuned")
    unstored = create(server, metadata={"task": "x", "run": "sdk"})

    listed = sdk.chat.completions.list(metadata={"task": "x", "run": "sdk"})
    assert [c.id for c in listed.data] == [x1.id, x2.id] and unstored.id not in {c.id for c in listed.data}
    assert [c.id for c in sdk.chat.completions.list(metadata={"run": "sdk"}, model="tuned")] == [x2.id]
    newest = sdk.chat.completions.list(metadata={"run": "sdk"}, order="desc", limit=2)
    assert [c.id for c in newest.data] == [x2.id, y.id] and newest.has_more
    assert [c.id for c in sdk.chat.completions.list(metadata={"run": "sdk"}, after=x1.id)] == [y.id, x2.id]

    got = sdk.chat.completions.retrieve(x2.id)
    assert got.choices[0].message.content == STORED and got.metadata == {"task": "x", "run": "sdk"}
    ember = got.model_extra["ember"]
    assert ember["adapter"] == "tuned" and ember["stream"] is False and ember["cached_tokens"] == 1
    assert ember["ttft_ms"] is not None and ember["latency_ms"] >= ember["ttft_ms"]
    assert got.usage.total_tokens == x2.usage.total_tokens

    messages = sdk.chat.completions.messages.list(x1.id)
    assert [(m.role, m.content) for m in messages.data] == [
        ("system", "Be brief."),
        ("user", "Mail me: [REDACTED:email]"),
    ]
    assert [m.id for m in sdk.chat.completions.messages.list(x1.id, order="desc", limit=1).data] == [
        f"{x1.id}-1"
    ]

    updated = sdk.chat.completions.update(y.id, metadata={"task": "x", "run": "sdk", "fixed": "1"})
    assert updated.metadata["fixed"] == "1"
    assert [c.id for c in sdk.chat.completions.list(metadata={"fixed": "1"})] == [y.id]

    deleted = sdk.chat.completions.delete(x1.id)
    assert deleted.deleted and deleted.object == "chat.completion.deleted" and deleted.id == x1.id
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.retrieve(x1.id)


def test_a_stream_is_stored_assembled_and_the_client_gets_only_what_it_asked_for(server):
    chunks = list(create(server, store=True, stream=True, metadata={"run": "stream"}))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)  # no usage chunk asked
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(PIECES)
    stored = client(server).chat.completions.retrieve(chunks[0].id)
    assert stored.object == "chat.completion" and stored.choices[0].message.content == STORED
    assert stored.choices[0].finish_reason == "stop" and stored.usage.prompt_tokens_details.cached_tokens == 1
    assert stored.model_extra["ember"]["stream"] is True

    with_usage = list(create(server, store=True, stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].usage is not None and not with_usage[-1].choices


def test_store_traces_stores_by_default_and_store_false_opts_out(server):
    settings = server[1].recorder.settings
    settings.always = True
    try:
        kept = create(server, metadata={"run": "always"})
        skipped = create(server, store=False, metadata={"run": "always"})
    finally:
        settings.always = False
    ids = [c.id for c in client(server).chat.completions.list(metadata={"run": "always"})]
    assert ids == [kept.id] and skipped.id not in ids


def test_feedback_is_kept_on_the_stored_completion(server):
    done = create(server, store=True)
    url, key = server[0] + f"/v1/chat/completions/{done.id}/feedback", {"Authorization": "Bearer key-a"}
    assert httpx.post(url, json={"score": 0.75, "label": "good"}, headers=key).status_code == 200
    r = httpx.post(url, json={"label": "concise"}, headers=key)
    assert r.json()["ember"]["score"] == 0.75 and r.json()["ember"]["labels"] == ["good", "concise"]
    assert client(server).chat.completions.retrieve(done.id).model_extra["ember"]["labels"] == [
        "good",
        "concise",
    ]
    for body, param in (({}, None), ({"score": "high"}, "score"), ({"score": 1, "bogus": 2}, "bogus")):
        bad = httpx.post(url, json=body, headers=key)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text


@pytest.mark.parametrize(
    "metadata",
    [{f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}],
    ids=["17 pairs", "long key", "long value"],
)
def test_metadata_past_openais_limits_is_a_400_naming_it(server, metadata):
    with pytest.raises(openai.BadRequestError) as caught:
        create(server, store=True, metadata=metadata)
    assert caught.value.body["param"] == "metadata"


def test_another_key_cannot_list_read_update_delete_or_rate_a_trace(server):
    mine = create(server, "key-a", store=True, metadata={"run": "tenancy"})
    other = client(server, "key-b")
    assert other.chat.completions.list(metadata={"run": "tenancy"}).data == []
    for attempt in (
        lambda: other.chat.completions.retrieve(mine.id),
        lambda: other.chat.completions.messages.list(mine.id),
        lambda: other.chat.completions.update(mine.id, metadata={"run": "stolen"}),
        lambda: other.chat.completions.delete(mine.id),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    r = httpx.post(
        server[0] + f"/v1/chat/completions/{mine.id}/feedback",
        json={"score": 0.0},
        headers={"Authorization": "Bearer key-b"},
    )
    assert r.status_code == 404
    kept = client(server).chat.completions.retrieve(mine.id)
    assert kept.metadata == {"run": "tenancy"} and kept.model_extra["ember"]["score"] is None
    assert httpx.get(server[0] + "/v1/chat/completions").status_code == 401  # no key: nobody's traces


def test_traces_are_counted_in_metrics(server):
    create(server, store=True)
    text = httpx.get(server[0] + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert 'ember:traces_dropped_total{model_name="' in text and "ember:traces_written_total" in text
