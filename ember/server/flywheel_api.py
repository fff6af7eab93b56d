"""/v1/flywheel: the data flywheel's routes. `POST /v1/flywheel/datasets` makes a fine-tuning file from the
caller's own stored completions (ember.flywheel.dataset): select, dedupe, relabel, export to /v1/files.
`create_dataset` is the same as a function, for the loop that builds on it.

Relabelling with a model of this server runs as the caller (its own adapters, an alias, the base);
with an external endpoint (`relabel.base_url`) only for the admin key, since it makes the server
connect where the request says. The endpoint's key is used for this request and never stored.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ember.flywheel.dataset import DatasetError, Selection, build, export, trainer_check
from ember.flywheel.dedupe import DedupeConfig
from ember.flywheel.relabel import Generation, endpoint_relabeller, server_relabeller
from ember.protocol.requests import check_metadata
from ember.server.files_api import Refusal, file_object
from ember.server.platform import PlatformContext
from ember.tokenizer import Tokenizer

ACCESS = {"/v1/flywheel/datasets": "user_or_admin"}
MAX_FILENAME = 255


class DedupeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    near_threshold: float | None = Field(default=0.8, gt=0.0, le=1.0)  # None: exact duplicates only
    shingle_size: int = Field(default=5, ge=1, le=64)
    num_perm: int = Field(default=128, ge=16, le=1024)


class RelabelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    base_url: str | None = Field(default=None, pattern=r"^https?://", max_length=2048)
    api_key: str | None = Field(default=None, max_length=4096)
    max_tokens: int | None = Field(default=512, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    concurrency: int = Field(default=4, ge=1, le=64)


class DatasetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, str] | None = None  # every pair among the trace's tags
    model: str | None = Field(default=None, max_length=256)  # as the requests named it
    created_after: int | None = Field(default=None, ge=0)  # unix seconds, inclusive
    created_before: int | None = Field(default=None, ge=0)  # exclusive
    min_score: float | None = None
    limit: int | None = Field(default=None, ge=1)
    include_truncated: bool = False
    method: Literal["sft", "dpo"] = "sft"
    dedupe: DedupeBody = Field(default_factory=DedupeBody)
    relabel: RelabelBody | None = None
    filename: str | None = Field(default=None, min_length=1, max_length=MAX_FILENAME)

    @field_validator("metadata")
    @classmethod
    def _limits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(v)


async def create_dataset(ctx: PlatformContext, tenant: str | None, body: DatasetRequest, admin: bool) -> dict:
    """The dataset `body` asks for, made of `tenant`'s traces and stored as `tenant`'s file: the
    flywheel.dataset object (the file, and what was selected, dropped and written)."""
    relabel, close = None, None
    if body.relabel is not None:
        gen = Generation(body.relabel.max_tokens, body.relabel.temperature)
        if body.relabel.base_url is None:
            relabel = server_relabeller(ctx.call, body.relabel.model, tenant, gen)
        elif not admin:
            raise Refusal(
                403,
                "relabelling with an external endpoint needs the admin key; relabel with a model of this "
                "server instead (leave out base_url)",
                param="relabel.base_url",
                code="forbidden",
            )
        else:
            relabel, close = endpoint_relabeller(
                body.relabel.base_url, body.relabel.model, body.relabel.api_key, gen
            )
    recorder = ctx.state.recorder
    if recorder is not None:  # what was captured a moment ago is part of the traffic too
        await recorder.flush()
    try:
        selection = Selection(
            metadata=body.metadata,
            model=body.model,
            since=body.created_after,
            until=body.created_before,
            min_score=body.min_score,
            limit=body.limit,
            include_truncated=body.include_truncated,
        )
        config = DedupeConfig(body.dedupe.near_threshold, body.dedupe.shingle_size, body.dedupe.num_perm)
        tokenizer = ctx.engine.tokenizer
        check = trainer_check(tokenizer, body.method) if isinstance(tokenizer, Tokenizer) else None
        concurrency = body.relabel.concurrency if body.relabel is not None else 1
        dataset = await build(
            ctx.platform.store, tenant, selection, body.method, config, relabel, concurrency, check
        )
    except DatasetError as exc:
        raise Refusal(400, str(exc), param=exc.param, code="invalid_dataset") from None
    finally:
        if close is not None:
            await close()
    filename = body.filename or f"flywheel-{body.method}.jsonl"
    try:
        row = await asyncio.to_thread(export, ctx.platform, tenant, dataset, filename)
    except DatasetError as exc:
        raise Refusal(400, str(exc), param=exc.param, code="empty_dataset") from None
    return {
        "object": "flywheel.dataset",
        "method": dataset.method,
        "file": file_object(row),
        "counts": dict(sorted(dataset.counts.items())),
        "trace_ids": dataset.trace_ids,
    }


def install(app: FastAPI, ctx: PlatformContext) -> None:
    @app.post("/v1/flywheel/datasets")
    async def datasets(body: DatasetRequest, request: Request) -> dict:
        return await create_dataset(ctx, ctx.tenant_of(request), body, ctx.is_admin(request))
