"""/v1/evals in the shape of OpenAI's Evals API: evals (a `custom` data source config with an item
schema, and testing criteria), their runs (data sources `jsonl` and `completions`, items given inline as
file_content or as a /v1/files file_id), run output items, cancel. The work is done by
ember.evals.runner.EvalRunner.

ember's additions: the `pairwise_model` grader (see ember.evals.graders), and in each of a run's
per_testing_criteria_results an `ember` object with the criterion's mean score and its bootstrap
confidence interval.

An eval, its runs and their output items belong to the key that created the eval: to any other key they
do not exist (404).
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ember.errors import InvalidRequest
from ember.evals.criteria import check_criteria
from ember.evals.evaluate import summarize
from ember.evals.runner import EvalRunner
from ember.evals.sources import MAX_ITEMS, check_data_source, data_source_config, source_items
from ember.protocol.requests import check_metadata
from ember.server.files_api import Refusal, listing, owned_file
from ember.server.platform import PlatformContext
from ember.store import db
from ember.store import evals as rows

EVAL = "/v1/evals/{eval_id}"
RUN = EVAL + "/runs/{run_id}"
ACCESS = {
    "/v1/evals": "user",
    EVAL: "user",
    EVAL + "/runs": "user",
    RUN: "user",
    RUN + "/cancel": "user",
    RUN + "/output_items": "user",
    RUN + "/output_items/{output_item_id}": "user",
}


class Metadata(BaseModel):
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _limits(cls, v):
        return check_metadata(v)


class EvalCreate(Metadata):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=256)
    data_source_config: dict
    testing_criteria: list[dict]


class EvalUpdate(Metadata):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=256)


class RunCreate(Metadata):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=256)
    data_source: dict


def eval_object(row: dict) -> dict:
    return {
        "object": "eval",
        "id": row["id"],
        "name": row["name"],
        "created_at": row["created_at"],
        "data_source_config": row["data_source_config"],
        "testing_criteria": row["testing_criteria"],
        "metadata": row["tags"],
    }


def run_object(row: dict, per_criteria: list[dict]) -> dict:
    usage = []
    if row["model"] is not None:
        usage.append(
            {
                "model_name": row["model"],
                "invocation_count": row["invocations"],
                "prompt_tokens": row["prompt_tokens"],
                "completion_tokens": row["completion_tokens"],
                "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
                "cached_tokens": row["cached_tokens"],
            }
        )
    return {
        "object": "eval.run",
        "id": row["id"],
        "eval_id": row["eval_id"],
        "name": row["name"],
        "model": row["model"],
        "status": row["status"],
        "created_at": row["created_at"],
        "data_source": row["data_source"],
        "error": row["failure"],
        "metadata": row["tags"],
        "report_url": "",
        "result_counts": {
            "total": row["total"],
            "passed": row["passed"],
            "failed": row["failed"],
            "errored": row["errored"],
        },
        "per_testing_criteria_results": per_criteria,
        "per_model_usage": usage,
    }


def output_item_object(row: dict, run: dict) -> dict:
    return {
        "object": "eval.run.output_item",
        "id": row["id"],
        "created_at": row["created_at"],
        "run_id": run["id"],
        "eval_id": run["eval_id"],
        "status": row["status"],
        "datasource_item_id": row["idx"],
        "datasource_item": row["item"]["item"],
        "results": row["results"],
        "sample": row["sample"],
    }


def install(app, ctx: PlatformContext) -> None:
    store, blobs = ctx.platform.store, ctx.platform.blobs
    runner = EvalRunner(ctx)
    ctx.services.append(runner)

    def owned_eval(eval_id: str, request: Request) -> dict:
        row = rows.get(store, rows.evals, eval_id)
        if row is None or row["tenant"] != ctx.tenant_of(request):
            raise Refusal(404, f"no eval with id '{eval_id}'", param="eval_id", code="eval_not_found")
        return row

    def owned_run(eval_id: str, run_id: str, request: Request) -> dict:
        owned_eval(eval_id, request)
        row = rows.get(store, rows.runs, run_id)
        if row is None or row["eval_id"] != eval_id:
            raise Refusal(
                404, f"no run with id '{run_id}' in eval {eval_id}", param="run_id", code="run_not_found"
            )
        return row

    def answer_run(row: dict) -> dict:
        per = row["summary"]
        if per is None:  # not finished: the counts so far
            per = summarize(row["testing_criteria"], rows.graded(store, row["id"]), row["seed"])
        return run_object(row, per)

    def order(value: str) -> bool:
        return value == "desc"

    @app.post("/v1/evals")
    async def create_eval(body: EvalCreate, request: Request) -> dict:
        config = data_source_config(body.data_source_config)
        criteria = check_criteria(body.testing_criteria)
        for i, c in enumerate(criteria):
            if c["type"] == "pairwise_model" and "reference" not in c:
                raise InvalidRequest(
                    f"testing_criteria[{i}].reference is required: in a run, a pairwise judge compares the sample "
                    "with it (e.g. '{{item.reference_answer}}')",
                    param=f"testing_criteria[{i}].reference",
                )
        row = {
            "id": db.new_id("eval"),
            "tenant": ctx.tenant_of(request),
            "name": body.name or "eval",
            "data_source_config": config,
            "testing_criteria": criteria,
            "tags": body.metadata,
            "created_at": db.now(),
        }
        return eval_object(await asyncio.to_thread(rows.insert_eval, store, row))

    @app.get("/v1/evals")
    async def list_evals(
        request: Request,
        after: str | None = None,
        limit: int = Query(20, ge=1, le=100),
        order_: Literal["asc", "desc"] = Query("asc", alias="order"),
        order_by: Literal["created_at", "updated_at"] = "created_at",
    ) -> dict:
        tenant = ctx.tenant_of(request)
        where = [rows.evals.c.tenant.is_(None) if tenant is None else rows.evals.c.tenant == tenant]
        found, more = await asyncio.to_thread(store.page, rows.evals, where, after, limit, order(order_))
        return listing([eval_object(r) for r in found], more)

    @app.get(EVAL)
    async def get_eval(eval_id: str, request: Request) -> dict:
        return eval_object(await asyncio.to_thread(owned_eval, eval_id, request))

    @app.post(EVAL)
    async def update_eval(eval_id: str, body: EvalUpdate, request: Request) -> dict:
        await asyncio.to_thread(owned_eval, eval_id, request)
        given = body.model_fields_set
        values = {"name": body.name} if "name" in given and body.name is not None else {}
        if "metadata" in given:
            values["tags"] = body.metadata
        if not values:
            return eval_object(await asyncio.to_thread(rows.get, store, rows.evals, eval_id))
        return eval_object(await asyncio.to_thread(rows.update_eval, store, eval_id, values))

    @app.delete(EVAL)
    async def delete_eval(eval_id: str, request: Request) -> dict:
        await asyncio.to_thread(owned_eval, eval_id, request)
        found, _ = await asyncio.to_thread(
            store.page, rows.runs, [rows.runs.c.eval_id == eval_id], None, MAX_ITEMS
        )
        for run in found:
            runner.cancel(run["id"])
        await asyncio.to_thread(rows.delete_eval, store, eval_id)
        return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}

    @app.post(EVAL + "/runs")
    async def create_run(eval_id: str, body: RunCreate, request: Request) -> dict:
        evaluation = await asyncio.to_thread(owned_eval, eval_id, request)
        tenant = ctx.tenant_of(request)
        source = check_data_source(body.data_source)

        def read_file(file_id: str) -> str:
            file = owned_file(store, file_id, tenant, param="data_source.source.id")
            return blobs.path(file["id"]).read_bytes().decode("utf-8", errors="replace")

        items = await asyncio.to_thread(
            source_items, source.get("source"), evaluation["data_source_config"]["schema"], read_file
        )
        row = {
            "id": db.new_id("evalrun"),
            "eval_id": eval_id,
            "tenant": tenant,
            "name": body.name or f"run of {evaluation['name']}",
            "model": source.get("model"),
            "data_source": source,
            "testing_criteria": evaluation["testing_criteria"],
            "status": "queued",
            "tags": body.metadata,
            "seed": 0,
            "created_at": db.now(),
        }
        row = await asyncio.to_thread(rows.insert_run, store, row, items)
        runner.wake()
        return await asyncio.to_thread(answer_run, row)

    @app.get(EVAL + "/runs")
    async def list_runs(
        eval_id: str,
        request: Request,
        after: str | None = None,
        limit: int = Query(20, ge=1, le=100),
        order_: Literal["asc", "desc"] = Query("asc", alias="order"),
        status: Literal["queued", "in_progress", "completed", "canceled", "failed"] | None = None,
    ) -> dict:
        await asyncio.to_thread(owned_eval, eval_id, request)
        where = [rows.runs.c.eval_id == eval_id, *([rows.runs.c.status == status] if status else [])]
        found, more = await asyncio.to_thread(store.page, rows.runs, where, after, limit, order(order_))
        return listing([await asyncio.to_thread(answer_run, r) for r in found], more)

    @app.get(RUN)
    async def get_run(eval_id: str, run_id: str, request: Request) -> dict:
        return await asyncio.to_thread(lambda: answer_run(owned_run(eval_id, run_id, request)))

    @app.post(RUN + "/cancel")
    async def cancel_run(eval_id: str, run_id: str, request: Request) -> dict:
        row = await asyncio.to_thread(owned_run, eval_id, run_id, request)
        if row["status"] != "canceled":
            values = {"status": "canceled", "finished_at": db.now()}
            if not await asyncio.to_thread(rows.set_status, store, run_id, values, rows.ACTIVE):
                raise Refusal(
                    409,
                    f"run {run_id} is {row['status']}; only a queued or running run can be canceled",
                    param="run_id",
                    code="run_not_cancelable",
                )
            runner.cancel(run_id)
        return await asyncio.to_thread(lambda: answer_run(rows.get(store, rows.runs, run_id)))

    @app.delete(RUN)
    async def delete_run(eval_id: str, run_id: str, request: Request) -> dict:
        await asyncio.to_thread(owned_run, eval_id, run_id, request)
        runner.cancel(run_id)
        await asyncio.to_thread(rows.delete_run, store, run_id)
        return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}

    @app.get(RUN + "/output_items")
    async def list_output_items(
        eval_id: str,
        run_id: str,
        request: Request,
        after: str | None = None,
        limit: int = Query(20, ge=1, le=100),
        order_: Literal["asc", "desc"] = Query("asc", alias="order"),
        status: Literal["pass", "fail"] | None = None,
    ) -> dict:
        run = await asyncio.to_thread(owned_run, eval_id, run_id, request)
        c = rows.items.c
        where = [c.run_id == run_id, c.done.is_(True), *([c.status == status] if status else [])]
        found, more = await asyncio.to_thread(store.page, rows.items, where, after, limit, order(order_))
        return listing([output_item_object(r, run) for r in found], more)

    @app.get(RUN + "/output_items/{output_item_id}")
    async def get_output_item(eval_id: str, run_id: str, output_item_id: str, request: Request) -> dict:
        run = await asyncio.to_thread(owned_run, eval_id, run_id, request)
        row = await asyncio.to_thread(rows.get, store, rows.items, output_item_id)
        if row is None or row["run_id"] != run_id or not row["done"]:
            raise Refusal(
                404,
                f"no output item with id '{output_item_id}' in run {run_id}",
                param="output_item_id",
                code="output_item_not_found",
            )
        return output_item_object(row, run)
