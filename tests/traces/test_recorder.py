"""The recorder: the request path only appends, the writer commits in batches and on stop, a full queue
drops (and counts) rather than waits, and nothing reaches the database unredacted."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest

from ember.store.db import Store, now
from ember.store.traces import traces
from ember.traces import Retention, TraceRecorder, TraceSettings, select
from ember.traces.recorder import BATCH_ROWS, _Captured


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(f"sqlite:///{tmp_path}/ember.db")


def captured(i: int, tenant: str | None = "key-a", text: str = "hi", **kw) -> _Captured:
    request = {"model": "m", "messages": [{"role": "user", "content": text}], "store": True}
    response = {
        "id": f"chatcmpl-{i}",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                  "prompt_tokens_details": {"cached_tokens": 2}},
    }  # fmt: skip
    fields = dict(created_at=now(), model="m", adapter=None, metadata={"n": str(i % 2)}, latency_ms=1.0)
    fields.update(kw)
    return _Captured(
        tenant, raw_request=json.dumps(request).encode(), response=response, ttft_ms=0.5, **fields
    )


def test_the_writer_commits_in_batches_and_everything_on_stop(store):
    recorder = TraceRecorder(store, TraceSettings(flush_ms=20))
    n = BATCH_ROWS * 2 + 10

    async def go():
        await recorder.start()
        for i in range(n):
            recorder.record(captured(i))
        await asyncio.sleep(0.1)  # two full batches woke the writer; the rest waits for flush_ms
        for i in range(n, n + 5):
            recorder.record(captured(i))
        await recorder.stop()

    asyncio.run(go())
    rows = select(store, "key-a")
    assert [r["id"] for r in rows] == [f"chatcmpl-{i}" for i in range(n + 5)]
    assert (
        recorder.written == n + 5 and rows[0]["cached_tokens"] == 2 and rows[0]["usage"]["total_tokens"] == 4
    )


def test_a_full_queue_drops_and_counts_instead_of_waiting(store):
    recorder = TraceRecorder(store, TraceSettings(max_queue=3))
    for i in range(5):
        recorder.record(captured(i))
    assert recorder.dropped["queue_full"] == 2
    asyncio.run(recorder.flush())
    assert len(select(store, "key-a")) == 3


def test_a_refused_batch_is_dropped_and_counted_not_retried(store):
    recorder = TraceRecorder(store)
    recorder.record(captured(1))
    recorder.record(captured(1))  # the same id twice: the batch's transaction fails
    asyncio.run(recorder.flush())
    assert recorder.dropped["write_failed"] == 2 and select(store, "key-a") == []
    recorder.record(captured(2))
    asyncio.run(recorder.flush())
    assert len(select(store, "key-a")) == 1


def test_redaction_happens_before_the_write(store, tmp_path):
    recorder = TraceRecorder(store, TraceSettings(redact=[r"ACME-\d+"]))
    recorder.record(captured(1, text="I am bob@example.com, card 4111 1111 1111 1111, ACME-42",
                            metadata={"who": "bob@example.com"}))  # fmt: skip
    asyncio.run(recorder.flush())
    raw = (
        sqlite3.connect(tmp_path / "ember.db")
        .execute("SELECT request, response, metadata FROM traces")
        .fetchone()
    )
    text = " ".join(raw)
    assert "bob@example.com" not in text and "4111" not in text and "ACME-42" not in text
    assert "[REDACTED:email]" in text and "[REDACTED:card]" in text and "[REDACTED]" in text


def test_select_filters_and_keeps_to_one_tenant(store):
    recorder = TraceRecorder(store)
    for i in range(6):
        recorder.record(captured(i, created_at=1000 + i, model="m" if i < 4 else "other"))
    recorder.record(captured(9, tenant="key-b"))
    recorder.record(captured(10, tenant=None))
    asyncio.run(recorder.flush())
    with store.tx() as conn:
        conn.execute(traces.update().where(traces.c.id == "chatcmpl-2").values(score=0.9))
    ids = lambda rows: [r["id"].removeprefix("chatcmpl-") for r in rows]  # noqa: E731
    assert ids(select(store, "key-a")) == ["0", "1", "2", "3", "4", "5"]
    assert ids(select(store, "key-a", metadata={"n": "1"})) == ["1", "3", "5"]
    assert ids(select(store, "key-a", model="other")) == ["4", "5"]
    assert ids(select(store, "key-a", since=1001, until=1003)) == ["1", "2"]
    assert ids(select(store, "key-a", min_score=0.5)) == ["2"]
    assert ids(select(store, "key-a", limit=2)) == ["0", "1"]
    assert ids(select(store, "key-b")) == ["9"] and ids(select(store, None)) == ["10"]


def test_retention_deletes_by_age_and_by_row_count(store):
    recorder = TraceRecorder(store)
    old = now() - 3 * 86400
    for i in range(10):
        recorder.record(captured(i, created_at=old if i < 3 else now()))
    asyncio.run(recorder.flush())
    assert Retention.parse("2d").prune(store) == 3
    assert Retention.parse("30d,4rows").prune(store) == 3
    assert [r["id"] for r in select(store, "key-a")] == [f"chatcmpl-{i}" for i in range(6, 10)]
    assert Retention.parse("off") == Retention()
    for bad in ("30x", "0rows", "soon"):
        with pytest.raises(ValueError, match="--trace-retention"):
            Retention.parse(bad)
