"""The flywheel as a durable job (a Service in ctx.services): a run goes dataset (stored completions ->
fine-tuning JSONL, optionally relabelled) -> tune (a job through /v1/fine_tuning's machinery, so it trains
in the tuning worker and the server loads the adapter) -> evaluate (the candidate against what the alias
serves now, on the eval's held-out items, paired) -> gate -> promote (repoint the alias, only if the gate
passed and the alias is still at the version evaluated) -> report, stored either way.

Each step writes its result to the run's row (ember.store.flywheel) before the next starts; a restarted
runner picks up every active run at its first step without a result. A tuning job the restart interrupted
is failed by the tuning runner, and the run fails with it, naming the job.

Runs go one at a time: they share the trainer, and each gates against what an alias serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ember.flywheel import parts as default_parts
from ember.flywheel.gate import Gate, decide
from ember.flywheel.report import render
from ember.server.platform import BATCH_PRIORITY, PlatformContext
from ember.store import db
from ember.store import flywheel as rows
from ember.tune.runner import ACTIVE as JOB_ACTIVE

log = logging.getLogger("ember.flywheel")

POLL_S = 0.5


class RunFailed(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Parts:
    """What the loop is made of, each one call: the defaults are ember's (ember.flywheel.parts); tests
    swap in fakes. Signatures: see ember.flywheel.parts."""

    dataset: Callable[..., Awaitable[dict]] = default_parts.dataset
    compare: Callable[..., Awaitable[dict]] = default_parts.compare
    alias: Callable[[PlatformContext, str, str | None], dict | None] = default_parts.alias
    repoint: Callable[..., Awaitable[dict]] = default_parts.repoint
    tune: Callable[..., Awaitable[dict]] = default_parts.tune


@dataclass
class FlywheelRunner:
    ctx: PlatformContext
    parts: Parts = field(default_factory=Parts)
    poll_s: float = 2.0
    # run id -> the relabelling endpoint's API key, held from the request to the dataset step, never stored
    secrets: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.ensure_future(self._main())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def wake(self) -> None:
        self._wake.set()

    async def idle(self) -> None:
        """Until no run is active (tests)."""
        while rows.active(self.ctx.platform.store):
            await asyncio.sleep(0.05)

    async def _main(self) -> None:
        wait_ready = getattr(self.ctx.engine, "wait_ready", None)
        if wait_ready is not None:
            await wait_ready()
        while True:
            self._wake.clear()
            for run_id in await asyncio.to_thread(rows.active, self.ctx.platform.store):
                await self._drive(run_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)

    # -- one run -------------------------------------------------------------------------------------

    async def _drive(self, run_id: str) -> None:
        store = self.ctx.platform.store
        steps = {
            "dataset": self._dataset,
            "tune": self._tune,
            "evaluate": self._evaluate,
            "gate": self._gate,
            "promote": self._promote,
        }
        try:
            for name in rows.STEPS:
                run = rows.get(store, run_id)
                if run is None or run["status"] not in rows.ACTIVE:
                    return
                if run["steps"].get(name, {}).get("finished_at"):
                    continue
                await self._begin(run, name)
                detail = await steps[name](rows.get(store, run_id))
                await self._end(run_id, name, detail)
            await self._finish(run_id)
        except asyncio.CancelledError:
            raise
        except RunFailed as exc:
            await self._fail(run_id, exc.code, str(exc))
        except Exception as exc:  # the runner goes on with the next run
            log.exception("flywheel run %s", run_id)
            await self._fail(run_id, "internal_error", f"{type(exc).__name__}: {exc}")

    async def _begin(self, run: dict, step: str) -> None:
        steps = {**run["steps"], step: {"status": "running", "started_at": time.time(), "detail": None}}
        values = {"status": "running", "step": step, "steps": steps}
        await asyncio.to_thread(rows.update, self.ctx.platform.store, run["id"], values)
        await asyncio.to_thread(rows.add_event, self.ctx.platform.store, run["id"], f"{step}: started", step)

    async def _end(self, run_id: str, step: str, detail: str | None) -> None:
        store = self.ctx.platform.store
        run = await asyncio.to_thread(rows.get, store, run_id)
        done = {**run["steps"][step], "status": "done", "finished_at": time.time(), "detail": detail}
        await asyncio.to_thread(rows.update, store, run_id, {"steps": {**run["steps"], step: done}})
        message = f"{step}: done" + (f": {detail}" if detail else "")
        await asyncio.to_thread(rows.add_event, store, run_id, message, step)

    async def _detail(self, run_id: str, step: str, detail: str) -> None:
        """Progress within a step (the tuning job's latest step) on the run's row."""
        store = self.ctx.platform.store
        run = await asyncio.to_thread(rows.get, store, run_id)
        if run["steps"].get(step, {}).get("detail") != detail:
            steps = {**run["steps"], step: {**run["steps"][step], "detail": detail}}
            await asyncio.to_thread(rows.update, store, run_id, {"steps": steps})

    async def _fail(self, run_id: str, code: str, message: str) -> None:
        store = self.ctx.platform.store
        values = {"status": "failed", "failure": {"code": code, "message": message}, "finished_at": db.now()}
        if not await asyncio.to_thread(rows.update, store, run_id, values):
            return  # cancelled meanwhile
        await asyncio.to_thread(rows.add_event, store, run_id, f"failed: {message}", None, "error")
        run = await asyncio.to_thread(rows.get, store, run_id)
        report = render(run)
        await asyncio.to_thread(rows.update, store, run_id, {"report": report}, ("failed",))

    # -- the steps: each returns a line of detail for its event, having written its result ------------

    async def _dataset(self, run: dict) -> str:
        spec = run["spec"]
        relabel = spec.get("relabel_with")
        if relabel is not None:
            keyed = relabel["keyed"]
            relabel = {k: v for k, v in relabel.items() if k != "keyed"}
            if keyed:
                if run["id"] not in self.secrets:
                    raise RunFailed(
                        "relabel_key_lost",
                        "the server restarted before the dataset was built, and the relabelling endpoint's "
                        "API key is never stored: start the run again",
                    )
                relabel["api_key"] = self.secrets[run["id"]]
        try:
            made = await self.parts.dataset(
                self.ctx, run["tenant"], spec["traces"], relabel, f"flywheel-{run['id']}"
            )
        except default_parts.DatasetFailed as exc:
            raise RunFailed("empty_dataset", f"the traces selected gave no dataset: {exc}") from None
        self.secrets.pop(run["id"], None)
        if made["examples"] < spec["min_examples"]:
            raise RunFailed(
                "too_few_examples",
                f"the traces selected gave {made['examples']} training examples (of {made['selected']} stored "
                f"completions); the run needs at least {spec['min_examples']}: widen the selection or send "
                "more traffic",
            )
        await asyncio.to_thread(rows.update, self.ctx.platform.store, run["id"], {"dataset": made})
        return f"{made['examples']} examples from {made['selected']} stored completions ({made['file_id']})"

    async def _tune(self, run: dict) -> str:
        store = self.ctx.platform.store
        if run["job_id"] is None:
            spec = run["spec"]
            job = await self.parts.tune(self.ctx, run["tenant"], run["dataset"]["file_id"], spec, run["id"])
            values = {"job_id": job["id"], "candidate": job["fine_tuned_model"]}
            await asyncio.to_thread(rows.update, store, run["id"], values)
            await asyncio.to_thread(
                rows.add_event, store, run["id"], f"tune: job {job['id']} created", "tune"
            )
            run = {**run, **values}
        while True:
            job = await asyncio.to_thread(store.get, db.jobs, run["job_id"])
            if job is None:
                raise RunFailed("job_failed", f"the fine-tuning job {run['job_id']} was deleted")
            if job["status"] not in JOB_ACTIVE:
                break
            latest, _ = await asyncio.to_thread(
                store.page, db.events, [db.events.c.job_id == job["id"]], None, 1
            )
            if latest:
                await self._detail(run["id"], "tune", f"{job['id']}: {latest[0]['message']}")
            current = await asyncio.to_thread(rows.get, store, run["id"])
            if current["status"] not in rows.ACTIVE:
                return "stopped"
            await asyncio.sleep(POLL_S)
        if job["status"] != "succeeded":
            why = (job["error"] or {}).get("message") or job["status"]
            raise RunFailed("job_failed", f"the fine-tuning job {job['id']} {job['status']}: {why}")
        return f"{job['id']} trained {job['trained_tokens']} tokens -> {job['fine_tuned_model']}"

    async def _evaluate(self, run: dict) -> str:
        spec, store = run["spec"], self.ctx.platform.store
        alias = self.parts.alias(self.ctx, spec["alias"], run["tenant"])
        if alias is None:
            raise RunFailed("alias_not_found", f"the alias '{spec['alias']}' was deleted during the run")
        # The baseline is pinned to the version the alias serves now, by the name that serves it.
        baseline = {"version": alias["version"], "serves": alias["serves"], "model": alias["model"]}
        latency: dict[str, list[float]] = {"a": [], "b": []}
        side = {alias["model"]: "a", run["candidate"]: "b"}

        async def timed(path: str, body: dict, tenant: str | None, priority: int = BATCH_PRIORITY):
            started = time.perf_counter()
            answer = await self.ctx.call(path, body, tenant, priority)
            if answer.ok and body.get("model") in side:
                latency[side[body["model"]]].append((time.perf_counter() - started) * 1000)
            return answer

        updates: set[asyncio.Task] = set()  # held until done: the loop keeps only weak references

        def progress(done: int, total: int) -> None:
            if done == total or done % max(1, total // 10) == 0:
                task = asyncio.ensure_future(self._detail(run["id"], "evaluate", f"{done}/{total} items"))
                updates.add(task)
                task.add_done_callback(updates.discard)

        gate = Gate(**spec["gate"])
        comparison = await self.parts.compare(
            timed, spec["eval"], alias["model"], run["candidate"], run["tenant"], gate, progress
        )
        comparison["latency_ms"] = latency
        values = {"baseline": baseline, "comparison": comparison}
        await asyncio.to_thread(rows.update, store, run["id"], values)
        first = comparison["criteria"][0]
        if first["diff"] is None:
            return f"{first['name']}: no item was scored on both sides"
        return (
            f"{first['name']}: {first['mean_a']:.3f} -> {first['mean_b']:.3f} "
            f"({first['diff']:+.3f} [{first['ci_low']:+.3f}, {first['ci_high']:+.3f}])"
        )

    async def _gate(self, run: dict) -> str:
        decision = decide(run["comparison"], Gate(**run["spec"]["gate"]))
        await asyncio.to_thread(rows.update, self.ctx.platform.store, run["id"], {"decision": decision})
        return "promote" if decision["promote"] else "reject: " + "; ".join(decision["reasons"])

    async def _promote(self, run: dict) -> str:
        if not run["decision"]["promote"]:
            return "not promoted"
        spec, store = run["spec"], self.ctx.platform.store
        alias = self.parts.alias(self.ctx, spec["alias"], run["tenant"])
        version = run["baseline"]["version"]
        promoted = None
        if alias is not None and alias["version"] == version:
            promoted = await self.parts.repoint(self.ctx, spec["alias"], run["candidate"], version, run["id"])
        if promoted is None:  # deleted, or repointed by someone else since it was evaluated
            why = f"the alias was repointed or deleted during the run (it was evaluated at version {version})"
            decision = {**run["decision"], "promote": False, "reasons": [*run["decision"]["reasons"], why]}
            await asyncio.to_thread(rows.update, store, run["id"], {"decision": decision})
            return "not promoted: " + why
        await asyncio.to_thread(rows.update, store, run["id"], {"promoted": promoted})
        return f"{spec['alias']} -> {run['candidate']} (version {promoted['version']})"

    async def _finish(self, run_id: str) -> None:
        store = self.ctx.platform.store
        run = {**await asyncio.to_thread(rows.get, store, run_id), "status": "completed"}
        values = {"status": "completed", "step": None, "report": render(run), "finished_at": db.now()}
        if await asyncio.to_thread(rows.update, store, run_id, values):
            verdict = "promoted" if run["promoted"] else "not promoted"
            await asyncio.to_thread(rows.add_event, store, run_id, f"completed: {verdict}; report written")


def suffix(alias: str) -> str:
    """The fine-tuned model's suffix for an alias (the job's suffix rule: letters, digits, - _ .)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", alias)[:64] or "flywheel"
