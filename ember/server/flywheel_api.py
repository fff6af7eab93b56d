"""/v1/flywheel/runs: the loop in one call. A run builds a dataset from stored completions, tunes an
adapter on it, evaluates it against what an alias serves and repoints the alias only if the gate passes;
its report is stored and returned either way (ember.flywheel.loop does the work).

Admin only: a run changes what an alias serves. It reads the stored completions of the API key named in
`traces.api_key` (presenting a key is the right to its traces, as a request made with it would be), else
the admin key's own; its dataset file and fine-tuning job are the admin's.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ember.errors import InvalidRequest
from ember.evals.graders import check_criteria
from ember.evals.sampling import check_input_messages, check_sampling_params
from ember.flywheel.gate import Gate
from ember.flywheel.loop import FlywheelRunner, suffix
from ember.protocol.requests import check_metadata
from ember.server.files_api import Refusal, listing
from ember.server.platform import PlatformContext
from ember.store import db
from ember.store import flywheel as rows
from ember.tune.spec import JobRequest, job_spec

ROUTE = "/v1/flywheel/runs/{run_id}"
ACCESS = {
    "/v1/flywheel/runs": "admin",
    ROUTE: "admin",
    ROUTE + "/events": "admin",
    ROUTE + "/cancel": "admin",
}
MAX_EVAL_ITEMS = 5000


class TraceSelection(BaseModel):
    """Which stored completions the dataset is made of (ember.traces.query.select's filters)."""

    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, str] | None = None
    model: str | None = None
    since: int | None = None
    until: int | None = None
    min_score: float | None = None
    limit: int | None = Field(default=None, ge=1)
    api_key: str | None = None  # whose completions; None: the admin key's own

    @field_validator("metadata")
    @classmethod
    def _limits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(v)


class Relabel(BaseModel):
    """A stronger model that answers the traced prompts again: a model or adapter this server serves, or
    one behind an OpenAI-compatible endpoint (`base_url`, with `api_key`)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    base_url: str | None = None
    api_key: str | None = None


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
    relabel_with: Relabel | None = None
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
        shown["relabel_with"] = {k: v for k, v in spec["relabel_with"].items() if k != "api_key"}
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


def install(app, ctx: PlatformContext) -> None:
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
        spec = check(ctx, runner, body, request)
        created = db.now()
        row = {
            "id": db.new_id("fwrun"),
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

    @app.get(ROUTE)
    async def retrieve(run_id: str, request: Request) -> dict:
        return run_object(await asyncio.to_thread(owned, run_id, request))

    @app.get(ROUTE + "/events")
    async def events(run_id: str, request: Request, after: int = Query(0, ge=0)) -> dict:
        await asyncio.to_thread(owned, run_id, request)
        found = await asyncio.to_thread(rows.list_events, store, run_id, after)
        return {"object": "list", "data": [event_object(e) for e in found], "has_more": False}

    @app.post(ROUTE + "/cancel")
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


def check(ctx: PlatformContext, runner: FlywheelRunner, body: RunRequest, request: Request) -> dict:
    """The run's spec as stored, or the 4xx that names what to change."""
    if ctx.state.tuning is None:
        raise InvalidRequest(
            "a flywheel run tunes an adapter: start the server with --fine-tuning",
            param=None,
            code="fine_tuning_disabled",
        )
    if runner.parts.alias(ctx, body.alias, ctx.tenant_of(request)) is None:
        raise Refusal(
            404, f"no alias named '{body.alias}'; create it with POST /v1/aliases", "alias", "alias_not_found"
        )
    traces = body.traces.model_dump(exclude={"api_key"})
    traces["tenant"] = ctx.tenant_of(request)
    if body.traces.api_key is not None:
        if not any(hmac.compare_digest(body.traces.api_key.encode(), k.encode()) for k in ctx.state.api_keys):
            raise InvalidRequest(
                "traces.api_key is not one of this server's API keys", param="traces.api_key"
            )
        traces["tenant"] = ctx.state.tenant(body.traces.api_key)
    # The job's options are checked now, so that a bad one is a 400 here, not a failed run later.
    job = JobRequest(
        model=ctx.model_name,
        training_file="file-checked-at-run",
        suffix=suffix(body.alias),
        method={"type": "supervised", "supervised": {"hyperparameters": body.hyperparameters or {}}},
        lora=body.lora,
        max_len=body.max_len,
    )
    hyper = job_spec(job)["hyperparameters"]
    try:
        gate = Gate(**body.gate.model_dump())
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="gate") from None
    check_criteria(body.eval.testing_criteria, "eval.testing_criteria")
    check_input_messages(body.eval.input_messages, "eval.input_messages")
    check_sampling_params(body.eval.sampling_params, "eval.sampling_params")
    names = [c["name"] for c in body.eval.testing_criteria]
    if gate.primary is not None and gate.primary not in names:
        raise InvalidRequest(
            f"gate.primary '{gate.primary}' is not a criterion; criteria: {', '.join(names)}",
            param="gate.primary",
        )
    return {
        "alias": body.alias,
        "traces": traces,
        "relabel_with": body.relabel_with.model_dump() if body.relabel_with else None,
        "eval": body.eval.model_dump(),
        "hyperparameters": hyper,
        "lora": body.lora,
        "max_len": body.max_len,
        "seed": body.seed,
        "min_examples": body.min_examples,
        "gate": gate.as_dict(),
        "metadata": body.metadata,
    }
