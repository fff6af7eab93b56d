"""The eval runner (a Service in ctx.services): drives every run from queued through in_progress to
completed (or failed, or canceled by the API), sampling each item through ctx.call at BATCH_PRIORITY in
the run owner's tenant and grading it with the eval's criteria.

Durable: a run's items are on disk from the moment it was acknowledged (ember.store.evals.insert_run);
each graded item is committed with its count; at start, and whenever woken, the runner picks up every run
still queued or in progress, so a restart resumes each with only the items not yet graded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ember.evals.evaluate import grade_all, item_status, summarize
from ember.evals.graders import Judge
from ember.evals.sampling import sample
from ember.server.platform import BATCH_PRIORITY, CallResult, PlatformContext
from ember.store import db
from ember.store import evals as rows

log = logging.getLogger(__name__)


class EvalRunner:
    def __init__(self, ctx: PlatformContext, concurrency: int = 16, poll_s: float = 2.0):
        self.ctx, self.store = ctx, ctx.platform.store
        self.concurrency, self.poll_s = concurrency, poll_s
        self._wake = asyncio.Event()
        self._halt: dict[str, asyncio.Event] = {}  # run id -> set on cancel or delete
        self._driving: dict[str, asyncio.Task] = {}
        self._main_task: asyncio.Task | None = None

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._main_task = asyncio.ensure_future(self._main())

    async def stop(self) -> None:
        tasks = [t for t in (self._main_task, *self._driving.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._driving.clear()

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, run_id: str) -> None:
        """The run is canceled (or deleted): stop grading its items."""
        self._halt.setdefault(run_id, asyncio.Event()).set()

    async def call(self, path: str, body: dict, tenant: str | None, priority: int) -> CallResult:
        return await self.ctx.call(path, body, tenant, priority)  # looked up each time: tests wrap it

    async def _main(self) -> None:
        wait_ready = getattr(self.ctx.engine, "wait_ready", None)
        if wait_ready is not None:
            await wait_ready()
        while True:
            self._wake.clear()
            for run in await asyncio.to_thread(rows.active, self.store):
                if run["id"] not in self._driving:
                    task = asyncio.ensure_future(self._drive(run["id"]))
                    self._driving[run["id"]] = task
                    task.add_done_callback(lambda _, r=run["id"]: self._driving.pop(r, None))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)

    async def _drive(self, run_id: str) -> None:
        try:
            await asyncio.to_thread(
                rows.set_status, self.store, run_id, {"status": "in_progress"}, ("queued",)
            )
            run = await asyncio.to_thread(rows.get, self.store, rows.runs, run_id)
            if run is None or run["status"] != "in_progress":
                return
            if await self._run(run):
                await asyncio.to_thread(self._finish, run_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the runner goes on with the other runs
            log.exception("eval run %s", run_id)
            failure = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
            values = {"status": "failed", "failure": failure, "finished_at": db.now()}
            rows.set_status(self.store, run_id, values, rows.ACTIVE)
        finally:
            self._halt.pop(run_id, None)

    async def _run(self, run: dict) -> bool:
        """Grade the run's ungraded items; False if it was halted first."""
        halt = self._halt.setdefault(run["id"], asyncio.Event())
        todo = await asyncio.to_thread(rows.pending, self.store, run["id"])
        gate = asyncio.Semaphore(self.concurrency)

        async def one(pending: dict) -> None:
            async with gate:
                if not halt.is_set():
                    await self._item(run, pending)

        work = asyncio.ensure_future(asyncio.gather(*(one(p) for p in todo)))
        halted = asyncio.ensure_future(halt.wait())
        await asyncio.wait({work, halted}, return_when=asyncio.FIRST_COMPLETED)
        halted.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return False
        work.result()
        return not halt.is_set()

    async def _item(self, run: dict, pending: dict) -> None:
        source, row = run["data_source"], pending["item"]
        item = row["item"]
        usage = {}
        if source["type"] == "completions":
            got = await sample(
                self.call,
                source["model"],
                source["input_messages"],
                item,
                source.get("sampling_params") or {},
                run["tenant"],
                BATCH_PRIORITY,
            )
            usage = {**got["usage"], "invocations": 1}
        else:
            got = {"output_text": "", **(row.get("sample") or {}), "error": None}
        grades = await grade_all(
            run["testing_criteria"], item, got, Judge(self.call, run["tenant"], BATCH_PRIORITY)
        )
        status = item_status(got, grades)
        answer = {"status": status, "results": [g.result() for g in grades], "sample": got}
        await asyncio.shield(
            asyncio.to_thread(rows.record, self.store, run["id"], pending["idx"], answer, usage)
        )

    def _finish(self, run_id: str) -> None:
        run = rows.get(self.store, rows.runs, run_id)
        summary = summarize(run["testing_criteria"], rows.graded(self.store, run_id), run["seed"])
        values = {"status": "completed", "summary": summary, "finished_at": db.now()}
        if run["total"] and run["errored"] == run["total"]:
            first = next((r for r in rows.graded(self.store, run_id)[0]["results"] if r.get("error")), {})
            message = f"every item errored; the first: {first.get('error', 'unknown')}"
            values.update(status="failed", failure={"code": "all_items_errored", "message": message})
        rows.set_status(self.store, run_id, values, ("in_progress",))
