"""/v1/flywheel: the data flywheel's routes.

`POST /v1/flywheel/datasets` makes a fine-tuning file from the caller's own stored completions
(ember.flywheel.dataset): select, dedupe, relabel, export to /v1/files. `create_dataset` is the same as a
function, for the loop that builds on it. Relabelling with a model of this server runs as the caller (its
own adapters, an alias, the base); with an external endpoint (`relabel.base_url`) only for the admin key,
since it makes the server connect where the request says. The endpoint's key is used for this request and
never stored.

`/v1/flywheel/runs`: the loop in one call (ember.flywheel.loop does the work; ember.flywheel.spec checks
the request). Admin only: a run changes what an alias serves.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ember.flywheel.dataset import DatasetError, Selection, build, export, trainer_check
from ember.flywheel.dedupe import DedupeConfig
from ember.flywheel.loop import FlywheelRunner
from ember.flywheel.relabel import Generation, endpoint_relabeller, server_relabeller
from ember.flywheel.spec import run_spec
from ember.protocol.requests import check_metadata
from ember.server.files_api import Refusal, file_object, listing
from ember.server.platform import PlatformContext
from ember.store import db
from ember.store import flywheel as rows
from ember.tokenizer import Tokenizer

RUN = "/v1/flywheel/runs/{run_id}"
ACCESS = {
    "/v1/flywheel/datasets": "user_or_admin",
    "/v1/flywheel/runs": "admin",
    RUN: "admin",
    RUN + "/events": "admin",
    RUN + "/cancel": "admin",
}
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


async def create_dataset(
    ctx: PlatformContext, tenant: str | None, body: DatasetRequest, admin: bool, owner: str | None = None
) -> dict:
    """The dataset `body` asks for, made of `tenant`'s traces and stored as `tenant`'s file (or `owner`'s:
    a flywheel run's file is the admin's, over a key's traces): the flywheel.dataset object (the file, and
    what was selected, dropped and written)."""
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
        row = await asyncio.to_thread(
            export, ctx.platform, tenant if owner is None else owner, dataset, filename
        )
    except DatasetError as exc:
        raise Refusal(400, str(exc), param=exc.param, code="empty_dataset") from None
    return {
        "object": "flywheel.dataset",
        "method": dataset.method,
        "file": file_object(row),
        "counts": dict(sorted(dataset.counts.items())),
        "trace_ids": dataset.trace_ids,
    }


def install_datasets(app: FastAPI, ctx: PlatformContext) -> None:
    @app.post("/v1/flywheel/datasets")
    async def datasets(body: DatasetRequest, request: Request) -> dict:
        return await create_dataset(ctx, ctx.tenant_of(request), body, ctx.is_admin(request))


MAX_EVAL_ITEMS = 5000


class TraceSelection(BaseModel):
    """Which stored completions a run trains on: a dataset request's selection and dedupe
    (DatasetRequest), and whose they are. `include_truncated` None: true when relabelling (the served
    answer is replaced), false otherwise."""

    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, str] | None = None
    model: str | None = Field(default=None, max_length=256)
    created_after: int | None = Field(default=None, ge=0)
    created_before: int | None = Field(default=None, ge=0)
    min_score: float | None = None
    limit: int | None = Field(default=None, ge=1)
    include_truncated: bool | None = None
    dedupe: DedupeBody = Field(default_factory=DedupeBody)
    api_key: str | None = None  # whose completions; None: the admin key's own

    @field_validator("metadata")
    @classmethod
    def _limits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(v)


class EvalSpec(BaseModel):
    """The held-out items and how to score them, in the Evals API's terms: `input_messages` is the template
    each item is rendered into (`{{item.x}}`), `testing_criteria` its graders."""

    model_config = ConfigDict(extra="forbid")
    items: list[dict[str, Any]] = Field(min_length=2, max_length=MAX_EVAL_ITEMS)
    input_messages: dict[str, Any] | list[dict[str, Any]]
    testing_criteria: list[dict[str, Any]] = Field(min_length=1)
    sampling_params: dict[str, Any] | None = None


class GateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    primary: str | None = None
    max_latency_ratio: float | None = 2.0
    confidence: float = 0.95
    n_boot: int = 2000
    seed: int = 0


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alias: str = Field(min_length=1)
    traces: TraceSelection
    relabel_with: RelabelBody | None = None
    eval: EvalSpec
    hyperparameters: dict[str, Any] | None = None  # the fine-tuning job's (n_epochs, batch_size, ...)
    lora: dict[str, Any] | None = None
    max_len: int | None = Field(default=None, ge=16, le=131072)
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    min_examples: int = Field(default=8, ge=1)
    gate: GateSpec = Field(default_factory=GateSpec)
    metadata: dict[str, str] | None = None


def run_object(row: dict) -> dict:
    """A run as the API shows it; the traced key's identity and any relabelling key are not shown."""
    spec = row["spec"]
    shown = {k: v for k, v in spec.items() if k not in ("traces", "relabel_with", "eval")}
    shown["traces"] = {k: v for k, v in spec["traces"].items() if k != "tenant" and v is not None}
    if spec.get("relabel_with"):
        shown["relabel_with"] = {k: v for k, v in spec["relabel_with"].items() if k != "keyed"}
    shown["eval"] = {
        "items": len(spec["eval"]["items"]),
        "testing_criteria": spec["eval"]["testing_criteria"],
    }
    return {
        "id": row["id"],
        "object": "flywheel.run",
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
        "status": row["status"],
        "step": row["step"],
        "steps": row["steps"],
        "alias": row["alias"],
        "spec": shown,
        "dataset": row["dataset"],
        "fine_tuning_job": row["job_id"],
        "candidate": row["candidate"],
        "baseline": row["baseline"],
        "comparison": row["comparison"],
        "decision": row["decision"],
        "promoted": row["promoted"],
        "error": row["failure"],
        "report": row["report"],
    }


def event_object(row: dict) -> dict:
    return {
        "id": row["id"],
        "object": "flywheel.run.event",
        "seq": row["seq"],
        "created_at": row["created_at"],
        "level": row["level"],
        "step": row["step"],
        "message": row["message"],
    }


def install(app: FastAPI, ctx: PlatformContext) -> None:
    install_datasets(app, ctx)
    install_runs(app, ctx)


def install_runs(app: FastAPI, ctx: PlatformContext) -> None:
    store = ctx.platform.store
    runner = FlywheelRunner(ctx)
    ctx.services.append(runner)
    app.state.flywheel_runner = runner  # tests wait on it and swap its parts

    def owned(run_id: str, request: Request) -> dict:
        row = rows.get(store, run_id)
        if row is None or row["tenant"] != ctx.tenant_of(request):
            raise Refusal(404, f"no flywheel run with id '{run_id}'", param="run_id", code="run_not_found")
        return row

    @app.post("/v1/flywheel/runs")
    async def create(body: RunRequest, request: Request) -> dict:
        spec = run_spec(ctx, runner.parts, body, ctx.tenant_of(request))
        created = db.now()
        run_id = db.new_id("fwrun")
        if body.relabel_with is not None and body.relabel_with.api_key is not None:
            runner.secrets[run_id] = body.relabel_with.api_key  # held for the dataset step, never stored
        row = {
            "id": run_id,
            "tenant": ctx.tenant_of(request),
            "alias": body.alias,
            "spec": spec,
            "status": "queued",
            "steps": {},
            "created_at": created,
        }
        row = await asyncio.to_thread(rows.insert, store, row)
        await asyncio.to_thread(rows.add_event, store, row["id"], f"queued: {body.alias}")
        runner.wake()
        return run_object(row)

    @app.get("/v1/flywheel/runs")
    async def list_runs(
        request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)
    ) -> dict:
        tenant = ctx.tenant_of(request)
        where = [rows.runs.c.tenant.is_(None) if tenant is None else rows.runs.c.tenant == tenant]
        found, more = await asyncio.to_thread(store.page, rows.runs, where, after, limit)
        return listing([run_object(r) for r in found], more)

    @app.get(RUN)
    async def retrieve(run_id: str, request: Request) -> dict:
        return run_object(await asyncio.to_thread(owned, run_id, request))

    @app.get(RUN + "/events")
    async def events(run_id: str, request: Request, after: int = Query(0, ge=0)) -> dict:
        await asyncio.to_thread(owned, run_id, request)
        found = await asyncio.to_thread(rows.list_events, store, run_id, after)
        return {"object": "list", "data": [event_object(e) for e in found], "has_more": False}

    @app.post(RUN + "/cancel")
    async def cancel(run_id: str, request: Request) -> dict:
        row = await asyncio.to_thread(owned, run_id, request)
        values = {"status": "cancelled", "finished_at": db.now()}
        if not await asyncio.to_thread(rows.update, store, run_id, values):
            raise Refusal(
                409,
                f"run {run_id} is {row['status']}; only a queued or running run can be cancelled",
                param="run_id",
                code="run_not_cancellable",
            )
        if row["job_id"] is not None:  # its training stops at the next step
            job = {"status": "cancelled", "finished_at": db.now(), "estimated_finish": None}
            await asyncio.to_thread(
                store.update, db.jobs, row["job_id"], job, ("validating_files", "queued", "running")
            )
        await asyncio.to_thread(rows.add_event, store, run_id, "cancelled")
        return run_object(rows.get(store, run_id))
