"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events and checkpoints, in OpenAI's shapes. Jobs
run in worker processes (ember.tune.runner); this module only checks requests and reads and writes rows.

Status: validating_files -> queued -> running -> succeeded | failed | cancelled, as OpenAI's. A job's
`fine_tuned_model` (ft:BASE:SUFFIX:ID) is served by this server once it has succeeded.
"""

from __future__ import annotations

import asyncio

from fastapi import Query, Request

from ember.errors import InvalidRequest
from ember.models.catalog import known_models
from ember.server.files_api import Refusal, listing, owned_file
from ember.store import db
from ember.store.db import Store
from ember.tune.runner import ACTIVE, TuningRunner
from ember.tune.spec import JobRequest, job_spec, method_object

ORGANIZATION = "org-ember"


def job_object(row: dict) -> dict:
    spec = row["spec"]
    hyper = {k: v for k, v in spec["hyperparameters"].items() if k != "beta"}
    return {
        "id": row["id"],
        "object": "fine_tuning.job",
        "created_at": row["created_at"],
        "error": row["error"],
        "fine_tuned_model": row["fine_tuned_model"] if row["status"] == "succeeded" else None,
        "finished_at": row["finished_at"],
        "hyperparameters": hyper,
        "model": row["model"],
        "organization_id": ORGANIZATION,
        "result_files": [],
        "seed": row["seed"],
        "status": row["status"],
        "trained_tokens": row["trained_tokens"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "estimated_finish": row["estimated_finish"] if row["status"] in ACTIVE else None,
        "integrations": None,
        "metadata": row["metadata"],
        "method": method_object(spec),
        "user_provided_suffix": row["suffix"],
    }


def event_object(row: dict) -> dict:
    return {
        "id": row["id"],
        "object": "fine_tuning.job.event",
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "data": row["data"] if row["data"] is not None else {},
        "type": row["type"],
    }


def checkpoint_object(row: dict, job: dict) -> dict:
    return {
        "id": row["id"],
        "object": "fine_tuning.job.checkpoint",
        "created_at": row["created_at"],
        "fine_tuned_model_checkpoint": f"{job['fine_tuned_model']}:ckpt-step-{row['step_number']}",
        "fine_tuning_job_id": job["id"],
        "metrics": row["metrics"],
        "step_number": row["step_number"],
    }


def served_base(engine, model_name: str) -> tuple[str, str | None, int | None]:
    """What a job on the served base model trains from: (the source the trainer loads, the chat template
    the server renders with, the engine's largest LoRA rank; None where the engine does not say)."""
    config = getattr(engine, "config", None)
    lora = getattr(config, "lora", None)
    source = getattr(config, "model", None) or model_name
    return source, getattr(config, "chat_template", None), getattr(lora, "max_rank", None)


async def submit(
    store: Store,
    runner: TuningRunner,
    body: JobRequest,
    tenant: str | None,
    admin: bool,
    source: str,
    chat_template: str | None,
    max_rank: int | None,
) -> dict:
    """Check a job request against `tenant`'s files and write the job, validating_files: the row. The route
    and the flywheel (which tunes on the dataset it exported) create jobs through this one path.
    `chat_template`: the one the server renders the base model with (trained on, so the adapter sees
    prompts as served); `admin`: the adapter is served to every key, else to `tenant` only."""
    spec = job_spec(body, max_rank)
    if chat_template is not None:
        spec["chat_template"] = chat_template
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        if file_id is None:
            continue
        row = owned_file(store, file_id, tenant, param=param)
        if row["purpose"] != "fine-tune":
            raise InvalidRequest(
                f"{param} {file_id} was uploaded with purpose '{row['purpose']}'; fine-tuning takes files "
                "of purpose 'fine-tune'",
                param=param,
                code="invalid_file_purpose",
            )
    job_id = db.new_id("ftjob")
    name = f"ft:{body.model}:{body.suffix or ''}:{job_id.removeprefix('ftjob-')}"
    row = {
        "id": job_id,
        "tenant": tenant,
        "owner": None if admin else tenant,
        "model": body.model,
        "source": source,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "spec": spec,
        "suffix": body.suffix,
        "seed": body.seed if body.seed is not None else 42,
        "metadata": body.metadata,
        "status": "validating_files",
        "error": None,
        "fine_tuned_model": name,
        "adapter_dir": None,
        "trained_tokens": None,
        "estimated_finish": None,
        "created_at": db.now(),
        "finished_at": None,
    }
    row = await asyncio.to_thread(store.insert, db.jobs, row)
    await asyncio.to_thread(store.add_event, job_id, f"Validating training file: {body.training_file}")
    runner.wake()
    return row


def install_tuning(
    router,
    store: Store,
    runner: TuningRunner,
    model_name: str,
    model_source: str,
    caller,  # request -> (tenant, is_admin)
    max_rank: int | None = None,
    chat_template: str | None = None,
) -> None:

    def owned_job(job_id: str, request: Request) -> dict:
        row = store.get(db.jobs, job_id)
        if row is None or row["tenant"] != caller(request)[0]:
            raise Refusal(
                404,
                f"no fine-tuning job with id '{job_id}'",
                param="fine_tuning_job_id",
                code="job_not_found",
            )
        return row

    def base_source(model: str) -> str:
        if model == model_name:
            return model_source
        if model in known_models():
            return model
        raise Refusal(
            404,
            f"model '{model}' cannot be fine-tuned here; fine-tunable: {model_name}, and the catalog's "
            f"{', '.join(m for m in known_models() if m != model_name)}",
            param="model",
            code="model_not_found",
        )

    @router.post("/v1/fine_tuning/jobs")
    async def create(body: JobRequest, request: Request) -> dict:
        tenant, admin = caller(request)
        source = base_source(body.model)
        template = chat_template if body.model == model_name else None
        row = await submit(store, runner, body, tenant, admin, source, template, max_rank)
        return job_object(row)

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(
        request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=1000)
    ) -> dict:
        tenant = caller(request)[0]
        # metadata[key]=value filters, as the SDK sends them
        want = {
            k[len("metadata[") : -1]: v for k, v in request.query_params.items() if k.startswith("metadata[")
        }
        where = [db.jobs.c.tenant.is_(None) if tenant is None else db.jobs.c.tenant == tenant]
        if not want:
            rows, more = await asyncio.to_thread(store.page, db.jobs, where, after, limit)
        else:  # few jobs per tenant: filter the JSON column here, on both databases alike
            rows, _ = await asyncio.to_thread(store.page, db.jobs, where, after, 100000)
            rows = [r for r in rows if want.items() <= (r["metadata"] or {}).items()]
            rows, more = rows[:limit], len(rows) > limit
        return {"object": "list", "data": [job_object(r) for r in rows], "has_more": more}

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve(job_id: str, request: Request) -> dict:
        return job_object(owned_job(job_id, request))

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(job_id: str, request: Request) -> dict:
        row = owned_job(job_id, request)
        values = {"status": "cancelled", "finished_at": db.now(), "estimated_finish": None}
        if not await asyncio.to_thread(store.update, db.jobs, job_id, values, ACTIVE):
            raise InvalidRequest(
                f"job {job_id} is {row['status']} already; only a job that is validating files, queued or "
                "running can be cancelled",
                param="fine_tuning_job_id",
                code="job_not_cancellable",
            )
        await asyncio.to_thread(store.add_event, job_id, "The job was cancelled")
        return job_object(store.get(db.jobs, job_id))

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def events(
        job_id: str, request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=10000)
    ) -> dict:
        owned_job(job_id, request)
        where = [db.events.c.job_id == job_id]
        rows, more = await asyncio.to_thread(store.page, db.events, where, after, limit)
        return {"object": "list", "data": [event_object(r) for r in rows], "has_more": more}

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def checkpoints(
        job_id: str, request: Request, after: str | None = None, limit: int = Query(10, ge=1, le=1000)
    ) -> dict:
        job = owned_job(job_id, request)
        where = [db.checkpoints.c.job_id == job_id]
        rows, more = await asyncio.to_thread(store.page, db.checkpoints, where, after, limit)
        return listing([checkpoint_object(r, job) for r in rows], more)


class Tuning:
    """The store, the files' directory and the job runner of one server (ServerState.tuning)."""

    def __init__(
        self,
        data_dir,
        database_url: str,
        engine,
        model_name: str,
        owners: dict[str, str],
        max_upload_bytes: int,
        max_jobs: int = 1,
        platform=None,  # ember.server.platform.Platform: its store and files; None: opened here
    ):
        from pathlib import Path

        from ember.store.files import FileStore

        self.data_dir = Path(data_dir)
        self.store = platform.store if platform is not None else Store(database_url)
        self.blobs = platform.blobs if platform is not None else FileStore(self.data_dir / "files")
        self.max_upload_bytes = max_upload_bytes
        self.runner = TuningRunner(self.store, self.data_dir, engine, model_name, owners, max_jobs)
