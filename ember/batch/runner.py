"""The batch runner (a Service in ctx.services): drives every active batch through validating ->
in_progress -> finalizing -> completed (or failed, expired, cancelling -> cancelled), running its lines
through ctx.call at BATCH_PRIORITY, as many at once as the engine batches (max_num_seqs, shared by all
batches), each in its owner's prefix-cache namespace.

Durable: a line's answer is committed with its count as it finishes (ember.store.batches.record), and the
state of a batch is its row; at start, and whenever woken, the runner picks up every batch still active,
so a restart after a crash resumes each with only the lines not yet answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time

from ember.batch import output
from ember.batch.validate import MAX_LINES, check
from ember.server.platform import BATCH_PRIORITY, PlatformContext
from ember.store import batches as rows
from ember.store import db

log = logging.getLogger(__name__)

WARM_MIN_LINES = 4
WARM_MIN_CHARS = 2000  # ~500 tokens: below it one warm-up step costs about what the shared prefill saves
RETRY = (429, 503)  # the engine is full, loading or restarting: the line waits and runs again
MAX_BACKOFF_S = 5.0


class BatchRunner:
    def __init__(self, ctx: PlatformContext, concurrency: int | None = None, poll_s: float = 2.0):
        self.ctx, self.platform = ctx, ctx.platform
        self.concurrency = concurrency or _engine_width(ctx.engine)
        self.poll_s = poll_s
        self._wake = asyncio.Event()
        self._halt: dict[str, asyncio.Event] = {}  # batch id -> set on cancel or expiry
        self._driving: dict[str, asyncio.Task] = {}
        self._main_task: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._answers: list[tuple[tuple, asyncio.Future]] = []  # waiting for the writer's next commit
        self._writer: asyncio.Task | None = None

    # -- the Service ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake, self._slots = asyncio.Event(), asyncio.Semaphore(self.concurrency)
        self._main_task = asyncio.ensure_future(self._main())

    async def stop(self) -> None:
        tasks = [t for t in (self._main_task, *self._driving.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._writer is not None:  # what finished is committed before the app goes
            with contextlib.suppress(Exception):
                await self._writer
        self._driving.clear()

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        """The batch's row says cancelling now: stop its lines."""
        self._halt.setdefault(batch_id, asyncio.Event()).set()
        self.wake()

    async def idle(self) -> None:
        """Until no batch is being driven (tests)."""
        while self._driving or rows.active(self.platform.store):
            await asyncio.sleep(0.01)

    # -- the loop ------------------------------------------------------------------------------------

    async def _main(self) -> None:
        wait_ready = getattr(self.ctx.engine, "wait_ready", None)
        if wait_ready is not None:
            await wait_ready()
        while True:
            self._wake.clear()
            for batch in await asyncio.to_thread(rows.active, self.platform.store):
                if batch["id"] not in self._driving:
                    task = asyncio.ensure_future(self._drive(batch["id"]))
                    self._driving[batch["id"]] = task
                    task.add_done_callback(lambda _, b=batch["id"]: self._driving.pop(b, None))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)

    async def _drive(self, batch_id: str) -> None:
        try:
            while (batch := await asyncio.to_thread(rows.get, self.platform.store, batch_id)) is not None:
                status = batch["status"]
                if status == "validating":
                    await asyncio.to_thread(self._validate, batch)
                elif status == "in_progress":
                    await self._run(batch)
                elif status == "finalizing":
                    await asyncio.to_thread(self._finish, batch, "completed", "finalizing")
                elif status == "cancelling":
                    await asyncio.to_thread(self._finish, batch, "cancelled", "cancelling")
                else:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the runner goes on with the other batches
            log.exception("batch %s", batch_id)
            self._fail(batch_id, "internal_error", f"{type(exc).__name__}: {exc}", rows.ACTIVE)
        finally:
            self._halt.pop(batch_id, None)

    # -- the phases ----------------------------------------------------------------------------------

    def _validate(self, batch: dict) -> None:
        store = self.platform.store
        file = store.get(db.files, batch["input_file_id"])
        if file is None or file["tenant"] != batch["tenant"]:
            self._fail(batch["id"], "file_not_found", f"the input file {batch['input_file_id']} was deleted")
            return
        checked = check(self.platform.blobs.path(file["id"]).read_bytes(), batch["endpoint"])
        if checked.too_many:
            self._fail(batch["id"], "too_many_requests", f"the input file has more than {MAX_LINES} requests")
            return
        if not checked.valid:
            errors = [
                {"code": r["code"], "message": r["message"], "param": r["param"], "line": r["line"]}
                for r in checked.rejects[:100]
            ] or [
                {
                    "code": "empty_file",
                    "message": "the input file has no requests",
                    "param": None,
                    "line": None,
                }
            ]
            self._fail(batch["id"], None, None, ("validating",), errors)
            return
        total = len(checked.valid) + len(checked.rejects)
        values = {
            "in_progress_at": db.now(),
            "model": checked.model,
            "rejects": checked.rejects,
            "total": total,
            "failed": len(checked.rejects),
        }
        rows.start(store, batch["id"], checked.valid, values)  # False: cancelled meanwhile; _drive rereads

    async def _run(self, batch: dict) -> None:
        """Run the batch's unanswered lines until none is left, or it is cancelled or expires."""
        halt = self._halt.setdefault(batch["id"], asyncio.Event())
        timer = asyncio.get_running_loop().call_later(max(0.0, batch["expires_at"] - time.time()), halt.set)
        todo = await asyncio.to_thread(rows.pending, self.platform.store, batch["id"])
        calls: set[asyncio.Task] = set()  # the engine calls in flight: what a halt cancels
        lines: set[asyncio.Task] = set()
        if len(todo) >= WARM_MIN_LINES and shares_prefix(batch["endpoint"], todo[0]["body"], todo[1]["body"]):
            await self._warm(batch, todo[0]["body"], halt)
        try:
            for line in todo:
                if not await self._acquire(halt):
                    break
                task = asyncio.ensure_future(self._line(batch, line, halt, calls))
                lines.add(task)
                task.add_done_callback(lambda t: (lines.discard(t), self._slots.release()))
            while lines and not halt.is_set():
                waiter = asyncio.ensure_future(halt.wait())
                await asyncio.wait({*lines, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
            for call in list(calls):
                call.cancel()  # a halt: what is running stops; its line stays unanswered
            await asyncio.gather(*lines, return_exceptions=True)
        finally:
            timer.cancel()
            for task in list(lines):
                task.cancel()
        if not halt.is_set():
            values = {"status": "finalizing", "finalizing_at": db.now()}
            await asyncio.to_thread(
                rows.set_status, self.platform.store, batch["id"], values, ("in_progress",)
            )
        elif time.time() >= batch["expires_at"]:
            now = await asyncio.to_thread(rows.get, self.platform.store, batch["id"])
            if now["status"] == "in_progress":  # a cancel that came first wins: the row says cancelling
                await asyncio.to_thread(self._finish, batch, "expired", "in_progress")

    async def _warm(self, batch: dict, body: dict, halt: asyncio.Event) -> None:
        """Prefill the first line's prompt once, alone, before the lines start together. The engine caches
        a block once computed, so lines admitted in the same step would each compute a prefix they share
        (a system prompt, few-shot examples); after this they find it cached. Costs one prompt's prefill;
        not counted in the batch's usage."""
        warm = {k: v for k, v in body.items() if k not in ("max_completion_tokens", "min_tokens", "n")}
        warm["max_tokens"] = 1
        call = asyncio.ensure_future(self.ctx.call(batch["endpoint"], warm, batch["tenant"], BATCH_PRIORITY))
        halted = asyncio.ensure_future(halt.wait())
        await asyncio.wait({call, halted}, return_when=asyncio.FIRST_COMPLETED)  # its answer: unused
        call.cancel()
        halted.cancel()

    async def _acquire(self, halt: asyncio.Event) -> bool:
        """A slot of the engine's width, or False once the batch is halted."""
        slot, halted = asyncio.ensure_future(self._slots.acquire()), asyncio.ensure_future(halt.wait())
        await asyncio.wait({slot, halted}, return_when=asyncio.FIRST_COMPLETED)
        halted.cancel()
        if not slot.done():
            slot.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await slot
        got = slot.done() and not slot.cancelled()
        if got and halt.is_set():
            self._slots.release()
        return got and not halt.is_set()

    async def _line(self, batch: dict, line: dict, halt: asyncio.Event, calls: set) -> None:
        backoff = 0.25
        while True:
            call = asyncio.ensure_future(
                self.ctx.call(batch["endpoint"], line["body"], batch["tenant"], BATCH_PRIORITY)
            )
            calls.add(call)
            try:
                result = await call
            finally:
                calls.discard(call)
            if result.status not in RETRY:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), backoff)
            if halt.is_set():
                return
            backoff = min(2 * backoff, MAX_BACKOFF_S)
        answer = {
            "status_code": result.status,
            "response": result.body,
            "id": "batch_req-" + secrets.token_hex(12),
            "request_id": "req-" + secrets.token_hex(12),
            "finished_at": db.now(),
        }
        await self._record((batch["id"], line["custom_id"], answer, usage_of(result.body)))

    async def _record(self, item: tuple) -> None:
        """Commit a line's answer, together with those of every line that finished meanwhile: the lines of
        one engine step finish at once, and one transaction (one fsync) for all of them keeps the runner
        off the critical path."""
        done = asyncio.get_running_loop().create_future()
        self._answers.append((item, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
        await asyncio.shield(done)  # a halt or stop never interrupts a commit

    async def _write(self) -> None:
        while self._answers:
            taken, self._answers = self._answers, []
            try:
                await asyncio.to_thread(rows.record, self.platform.store, [item for item, _ in taken])
            except Exception as exc:
                for _, done in taken:
                    done.set_exception(exc)
            else:
                for _, done in taken:
                    done.set_result(None)

    def _finish(self, batch: dict, final: str, now_status: str) -> None:
        """Write the output and error files from the rows, then move the batch to `final`."""
        output_id, error_id = output.write(self.platform, batch, final)
        values = {
            "status": final,
            f"{final}_at": db.now(),
            "output_file_id": output_id,
            "error_file_id": error_id,
        }
        rows.set_status(self.platform.store, batch["id"], values, (now_status,))

    def _fail(
        self, batch_id: str, code, message, only_if=("validating",), errors: list | None = None
    ) -> None:
        errors = errors or [{"code": code, "message": message, "param": None, "line": None}]
        values = {"status": "failed", "failed_at": db.now(), "errors": errors}
        rows.set_status(self.platform.store, batch_id, values, only_if)


def shares_prefix(endpoint: str, a: dict, b: dict) -> bool:
    """Whether two lines' prompts begin alike (a system prompt, few-shot examples): worth a warm-up."""
    if endpoint == "/v1/chat/completions":
        first = [
            m["messages"][0] if isinstance(m.get("messages"), list) and m["messages"] else None
            for m in (a, b)
        ]
        return first[0] is not None and first[0] == first[1] and len(json.dumps(first[0])) >= WARM_MIN_CHARS
    if endpoint == "/v1/completions":
        pa, pb = a.get("prompt"), b.get("prompt")
        if isinstance(pa, str) and isinstance(pb, str):
            return len(os.path.commonprefix([pa, pb])) >= WARM_MIN_CHARS
    return False


def usage_of(body: dict) -> dict:
    """A response's token counts, whichever API's names it uses (chat/completions or responses)."""
    u = body.get("usage") or {}
    details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}
    return {
        "input_tokens": u.get("prompt_tokens", u.get("input_tokens", 0)) or 0,
        "output_tokens": u.get("completion_tokens", u.get("output_tokens", 0)) or 0,
        "cached_tokens": details.get("cached_tokens", 0) or 0,
    }


def _engine_width(engine) -> int:
    """The sequences the engine runs at once: enough lines in flight to fill every step."""
    scheduler = getattr(getattr(engine, "config", None), "scheduler", None)
    return getattr(scheduler, "max_num_seqs", None) or 16
