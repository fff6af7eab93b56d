"""/v1/batches: create, retrieve, list and cancel, in OpenAI's shapes, over /v1/files (input of purpose
`batch`; output and error files of purpose `batch_output`). The work is done by ember.batch.runner.

A batch belongs to the key that created it, and may only read that key's files: to another key it does
not exist (404).
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import Query, Request
from pydantic import BaseModel, ConfigDict, Field

from ember.batch.runner import BatchRunner
from ember.errors import InvalidRequest
from ember.server.files_api import Refusal, listing, owned_file
from ember.server.platform import PlatformContext
from ember.store import batches as rows
from ember.store import db

ACCESS = {
    "/v1/batches": "user",
    "/v1/batches/{batch_id}": "user",
    "/v1/batches/{batch_id}/cancel": "user",
}
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")  # and /v1/responses where served
WINDOW_S = {"24h": 24 * 3600}
TIMESTAMPS = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


class OutputExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2592000)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    output_expires_after: OutputExpiresAfter | None = None


def batch_object(row: dict) -> dict:
    usage = {
        "input_tokens": row["input_tokens"],
        "input_tokens_details": {"cached_tokens": row["cached_tokens"]},
        "output_tokens": row["output_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": row["input_tokens"] + row["output_tokens"],
    }
    return {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "model": row["model"],
        "errors": {"object": "list", "data": row["errors"]} if row["errors"] else None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "created_at": row["created_at"],
        **{name: row[name] for name in TIMESTAMPS},
        "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
        "usage": usage,
        "metadata": row["metadata"],
    }


def install(app, ctx: PlatformContext) -> None:
    store = ctx.platform.store
    runner = BatchRunner(ctx)
    ctx.services.append(runner)
    app.state.batch_runner = runner  # tests wait on it

    def owned(batch_id: str, request: Request) -> dict:
        row = rows.get(store, batch_id)
        if row is None or row["tenant"] != ctx.tenant_of(request):
            raise Refusal(404, f"no batch with id '{batch_id}'", param="batch_id", code="batch_not_found")
        return row

    @app.post("/v1/batches")
    async def create(body: BatchRequest, request: Request) -> dict:
        tenant = ctx.tenant_of(request)
        served = [*ENDPOINTS, *(["/v1/responses"] if "/v1/responses" in ctx.endpoints else [])]
        if body.endpoint not in served:
            raise InvalidRequest(
                f"endpoint '{body.endpoint}' cannot be batched here; one of: {', '.join(served)}",
                param="endpoint",
                code="invalid_endpoint",
            )
        if body.completion_window not in WINDOW_S:
            raise InvalidRequest(
                f"completion_window must be '24h' (got {body.completion_window!r})", param="completion_window"
            )
        file = owned_file(store, body.input_file_id, tenant, param="input_file_id")
        if file["purpose"] != "batch":
            raise InvalidRequest(
                f"input_file_id {file['id']} was uploaded with purpose '{file['purpose']}'; a batch takes a "
                "file of purpose 'batch'",
                param="input_file_id",
                code="invalid_file_purpose",
            )
        created = db.now()
        row = {
            "id": db.new_id("batch"),
            "tenant": tenant,
            "endpoint": body.endpoint,
            "input_file_id": file["id"],
            "completion_window": body.completion_window,
            "status": "validating",
            "metadata": body.metadata,
            "output_expires_s": body.output_expires_after.seconds if body.output_expires_after else None,
            "created_at": created,
            "expires_at": created + WINDOW_S[body.completion_window],
        }
        row = await asyncio.to_thread(rows.insert, store, row)
        runner.wake()
        return batch_object(row)

    @app.get("/v1/batches")
    async def list_batches(
        request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)
    ) -> dict:
        tenant = ctx.tenant_of(request)
        where = [rows.batches.c.tenant.is_(None) if tenant is None else rows.batches.c.tenant == tenant]
        found, more = await asyncio.to_thread(store.page, rows.batches, where, after, limit)
        return listing([batch_object(r) for r in found], more)

    @app.get("/v1/batches/{batch_id}")
    async def retrieve(batch_id: str, request: Request) -> dict:
        return batch_object(await asyncio.to_thread(owned, batch_id, request))

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str, request: Request) -> dict:
        row = await asyncio.to_thread(owned, batch_id, request)
        if row["status"] in ("cancelling", "cancelled"):
            return batch_object(row)
        values = {"status": "cancelling", "cancelling_at": db.now()}
        if not await asyncio.to_thread(
            rows.set_status, store, batch_id, values, ("validating", "in_progress")
        ):
            raise Refusal(
                409,
                f"batch {batch_id} is {rows.get(store, batch_id)['status']}; only a batch that is validating or "
                "in progress can be cancelled",
                param="batch_id",
                code="batch_not_cancellable",
            )
        runner.cancel(batch_id)
        return batch_object(rows.get(store, batch_id))
