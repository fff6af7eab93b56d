"""The server's side of fine-tuning: it starts a worker process (ember.tune.worker) per job phase, one
training at a time by default, and serves what succeeds. Nothing here trains or parses data: the
serving process only waits on children and writes a few rows.

At start (`recover`): a job the server was running when it died is failed (its worker died with it), or
finished if its worker had already written the adapter; every succeeded job's adapter is registered
again; queued jobs run in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

from ember.store import db
from ember.store.db import Store
from ember.tune.worker import job_dir

log = logging.getLogger("ember.tune")

POLL_S = 0.25
CANCEL_GRACE_S = 10.0  # a cancelled job's worker that has not stopped by then is killed
RESTARTED = "the server restarted while this job was running; create the job again"
ACTIVE = ("validating_files", "queued", "running")


def _die_with_parent() -> None:  # in the child, before exec: SIGKILL when the server goes (Linux)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TuningRunner:
    def __init__(
        self,
        store: Store,
        data_dir: str | Path,
        engine,
        model_name: str,
        owners: dict[str, str],
        max_jobs: int = 1,
        trainer: str = "ember.tune.trainer",
        data: str = "ember.tune.data",
    ):
        self.store, self.data_dir, self.engine = store, Path(data_dir), engine
        self.model_name, self.owners, self.max_jobs = model_name, owners, max_jobs
        self.trainer, self.data = trainer, data  # the modules the worker uses (tests swap in fakes)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._procs: set[asyncio.subprocess.Process] = set()

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._main())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for proc in list(self._procs):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _main(self) -> None:
        wait_ready = getattr(self.engine, "wait_ready", None)
        if wait_ready is not None:
            await wait_ready()
        await self.recover()
        lanes = [self._lane("validating_files", "validate")]
        lanes += [self._lane("queued", "train") for _ in range(self.max_jobs)]
        await asyncio.gather(*lanes)

    async def recover(self) -> None:
        for job in self.store.jobs_in("running"):
            if job["adapter_dir"]:
                await self._finish(job)
            else:
                self._fail(job["id"], "server_restarted", RESTARTED)
        for job in self.store.jobs_in("succeeded"):
            await self._serve(job, at_start=True)

    async def _lane(self, status: str, phase: str) -> None:
        while True:
            job = next(iter(self.store.jobs_in(status)), None)
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 2.0)
                continue
            if phase == "train" and not self.store.update(
                db.jobs, job["id"], {"status": "running"}, only_if_status=("queued",)
            ):
                continue  # another lane took it, or it was cancelled meanwhile
            try:
                await self._run(job["id"], phase)
            except Exception as exc:  # the lane goes on with the next job
                log.exception("fine-tuning job %s", job["id"])
                self._fail(job["id"], "internal_error", f"{type(exc).__name__}: {exc}")

    async def _run(self, job_id: str, phase: str) -> None:
        out = job_dir(self.data_dir, job_id)
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "ember.tune.worker", phase, job_id, "--database-url", self.store.url]
        cmd += ["--data-dir", str(self.data_dir), "--parent", str(os.getpid())]
        cmd += ["--trainer", self.trainer, "--data", self.data]
        logfile = out / f"{phase}.log"
        with open(logfile, "ab") as sink:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink, preexec_fn=_die_with_parent
            )
        self._procs.add(proc)
        given_up = None
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), POLL_S)
                if proc.returncode is not None:
                    break
                job = self.store.get(db.jobs, job_id)
                if job is None or job["status"] not in ACTIVE:  # cancelled: it stops at its next step
                    given_up = given_up or asyncio.get_running_loop().time()
                    if asyncio.get_running_loop().time() - given_up > CANCEL_GRACE_S:
                        proc.kill()
        finally:
            self._procs.discard(proc)
        job = self.store.get(db.jobs, job_id)
        if job is None or job["status"] not in ACTIVE:
            return
        if phase == "train" and job["status"] == "running" and job["adapter_dir"]:
            await self._finish(job)
        elif (phase == "train" and job["status"] == "running") or job["status"] == "validating_files":
            tail = _tail(logfile)
            why = f"the {phase} process exited with code {proc.returncode}" + (f": {tail}" if tail else "")
            self._fail(job_id, "worker_failed", why)

    async def _finish(self, job: dict) -> None:
        """Serve the trained adapter, then say succeeded: a client that sees succeeded can use it."""
        if await self._serve(job):
            done = {"status": "succeeded", "finished_at": db.now(), "estimated_finish": None}
            if self.store.update(db.jobs, job["id"], done, only_if_status=("running",)):
                self.store.add_event(job["id"], "The job has successfully completed")

    async def _serve(self, job: dict, at_start: bool = False) -> bool:
        name, path = job["fine_tuned_model"], job["adapter_dir"]
        if job["model"] != self.model_name:
            if not at_start:
                self.store.add_event(
                    job["id"], f"{name} is not served here: this server serves {self.model_name}"
                )
            return True
        if name in getattr(self.engine, "adapters", {}):
            return True
        try:
            await self.engine.add_lora(name, path)
        except Exception as exc:
            if at_start:
                log.warning("fine-tuned model %s (%s) cannot be served: %s", name, path, exc)
                return False
            self._fail(
                job["id"], "adapter_not_served", f"the adapter was trained but cannot be served: {exc}"
            )
            return False
        if job["owner"] is not None:
            self.owners[name] = job["owner"]
        log.info("serving fine-tuned model %s", name)
        return True

    def _fail(self, job_id: str, code: str, message: str) -> None:
        values = {"status": "failed", "finished_at": db.now(), "estimated_finish": None}
        values["error"] = {"code": code, "message": message, "param": None}
        if self.store.update(db.jobs, job_id, values, only_if_status=ACTIVE):
            self.store.add_event(job_id, f"The job failed: {message}", level="error")


def _tail(path: Path) -> str:
    """The last line of a worker's log (its exception, typically)."""
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:500] if lines else ""
    return ""
