"""OpenAI's stored chat completions over the traces the recorder captured: list (by model and metadata),
retrieve, update metadata, delete, the input messages; and ember's feedback route, a score or a label on
a stored completion (shown in retrieve under `ember`). A trace belongs to the key whose request made it:
to every other key it does not exist (404).

Reads first flush the recorder, so a completion is listed as soon as its answer was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Literal

import sqlalchemy as sa
from fastapi import FastAPI, Query, Request
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ember.protocol.requests import check_metadata
from ember.server.files_api import Refusal, listing
from ember.server.platform import PlatformContext
from ember.store.traces import traces
from ember.traces.query import filters, owned
from ember.traces.recorder import TraceRecorder

ROUTE = "/v1/chat/completions/{completion_id}"
ACCESS = {
    "/v1/chat/completions": "user",  # POST is the chat route; GET the listing
    ROUTE: "user",
    ROUTE + "/messages": "user",
    ROUTE + "/feedback": "user",
}
MAX_LIMIT = 100
MAX_LABEL = 256


class MetadataUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    metadata: dict[str, str] | None

    @field_validator("metadata")
    @classmethod
    def _limits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(v)


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    score: float | None = None
    label: str | None = Field(default=None, min_length=1, max_length=MAX_LABEL)

    @field_validator("score", mode="before")
    @classmethod
    def _number(cls, v):
        if isinstance(v, bool) or (v is not None and not isinstance(v, int | float)):
            raise ValueError("must be a number")
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return float(v) if v is not None else None

    @model_validator(mode="after")
    def _something(self):
        if self.score is None and self.label is None:
            raise ValueError("give a score, a label or both")
        return self


def completion_object(row: dict) -> dict:
    """The stored chat.completion as OpenAI returns it (with its metadata), and what ember knows of it."""
    return {
        **row["response"],
        "metadata": row["metadata"],
        "ember": {
            "score": row["score"],
            "labels": row["labels"],
            "adapter": row["adapter"],
            "stream": row["stream"],
            "latency_ms": row["latency_ms"],
            "ttft_ms": row["ttft_ms"],
            "cached_tokens": row["cached_tokens"],
        },
    }


def stored_messages(row: dict) -> list[dict]:
    """The request's messages in the shape of OpenAI's ChatCompletionStoreMessage."""
    out = []
    for i, m in enumerate(row["request"].get("messages", [])):
        content, parts = m.get("content"), None
        if isinstance(content, list):
            parts = content
            content = "".join(p.get("text") or "" for p in content if p.get("type") == "text")
        message = {
            "id": f"{row['id']}-{i}",
            "role": m.get("role"),
            "content": content,
            "content_parts": parts,
        }
        for key in ("name", "tool_calls", "tool_call_id"):
            if m.get(key) is not None:
                message[key] = m[key]
        out.append(message)
    return out


class _Counts(Collector):
    """ember:traces_written_total and ember:traces_dropped_total{reason} of a recorder."""

    def __init__(self, recorder: TraceRecorder, metrics):
        self.recorder, self.metrics = recorder, metrics

    def collect(self):
        name = self.metrics.model_name
        written = CounterMetricFamily("ember:traces_written", "Traces committed.", labels=["model_name"])
        written.add_metric([name], self.recorder.written)
        dropped = CounterMetricFamily(
            "ember:traces_dropped",
            "Traces not stored: the queue was full, or the database refused the batch.",
            labels=["model_name", "reason"],
        )
        for reason, n in self.recorder.dropped.items():
            dropped.add_metric([name, reason], n)
        return [written, dropped]


def install(app: FastAPI, ctx: PlatformContext) -> None:
    state, store = ctx.state, ctx.platform.store
    if state.recorder is None:  # ember serve makes one from its flags; else: store: true only
        state.recorder = TraceRecorder(store)
    recorder: TraceRecorder = state.recorder
    ctx.services.append(recorder)
    with contextlib.suppress(ValueError):  # a second app over the same engine: the first's counts stay
        ctx.engine.metrics.registry.register(_Counts(recorder, ctx.engine.metrics))

    def owned_row(completion_id: str, request: Request) -> dict:
        with store.engine.connect() as conn:
            row = conn.execute(
                sa.select(traces).where(traces.c.id == completion_id, owned(ctx.tenant_of(request)))
            ).first()
        if row is None:
            raise Refusal(
                404, f"no stored chat completion with id '{completion_id}'", "completion_id", "not_found"
            )
        return dict(row._mapping)

    async def read(completion_id: str, request: Request) -> dict:
        await recorder.flush()
        return await asyncio.to_thread(owned_row, completion_id, request)

    def update(row: dict, values: dict) -> dict:
        with store.tx() as conn:
            conn.execute(traces.update().where(traces.c.seq == row["seq"]).values(**values))
        return {**row, **values}

    @app.get("/v1/chat/completions")
    async def list_completions(
        request: Request,
        model: str | None = None,
        after: str | None = None,
        limit: int = Query(20, ge=1, le=MAX_LIMIT),
        order: Literal["asc", "desc"] = "asc",
    ) -> dict:
        """metadata[KEY]=VALUE (repeatable, as the SDK sends a dict) keeps completions with those tags."""
        tags = {
            k[len("metadata[") : -1]: v
            for k, v in request.query_params.multi_items()
            if k.startswith("metadata[") and k.endswith("]")
        }
        await recorder.flush()
        where = filters(ctx.tenant_of(request), metadata=tags, model=model)
        rows, more = await asyncio.to_thread(store.page, traces, where, after, limit, order == "desc")
        return listing([completion_object(r) for r in rows], more)

    @app.get(ROUTE)
    async def retrieve(completion_id: str, request: Request) -> dict:
        return completion_object(await read(completion_id, request))

    @app.post(ROUTE)
    async def update_metadata(completion_id: str, body: MetadataUpdate, request: Request) -> dict:
        row = await read(completion_id, request)
        return completion_object(await asyncio.to_thread(update, row, {"metadata": body.metadata or {}}))

    @app.delete(ROUTE)
    async def delete(completion_id: str, request: Request) -> dict:
        row = await read(completion_id, request)
        await asyncio.to_thread(store.delete, traces, row["id"])
        return {"id": row["id"], "object": "chat.completion.deleted", "deleted": True}

    @app.get(ROUTE + "/messages")
    async def messages(
        completion_id: str,
        request: Request,
        after: str | None = None,
        limit: int = Query(20, ge=1, le=MAX_LIMIT),
        order: Literal["asc", "desc"] = "asc",
    ) -> dict:
        found = stored_messages(await read(completion_id, request))
        if order == "desc":
            found.reverse()
        ids = [m["id"] for m in found]
        start = ids.index(after) + 1 if after in ids else 0
        page = found[start : start + limit]
        return listing(page, start + limit < len(found))

    @app.post(ROUTE + "/feedback")
    async def feedback(completion_id: str, body: Feedback, request: Request) -> dict:
        row = await read(completion_id, request)
        values = {}
        if body.score is not None:
            values["score"] = body.score
        if body.label is not None and body.label not in row["labels"]:
            values["labels"] = [*row["labels"], body.label]
        return completion_object(await asyncio.to_thread(update, row, values) if values else row)
