"""Usage metering: every request admitted on a metered endpoint becomes one `usage` row (prompt, cached
and output tokens, its cost from the price table) and counts in the Prometheus series, labelled by key
id (never the key), team and model. Rows are queued in memory and written in batches by a Service, off
the request path, as ember.traces.recorder writes traces; the same transaction settles the request's
budget reservation (ember.gateway.budgets). A clean stop writes everything queued.

Prices (`--prices FILE`, JSON or YAML), in USD per million tokens:

    {"models": {"smollm2-135m-instruct": {"input": 0.1, "cached_input": 0.05, "output": 0.2}},
     "default": {"input": 0, "output": 0}, "batch_discount": 0.5}

Cached prompt tokens cost `cached_input` (default: `input`); a batch line costs `batch_discount` times
its price (default 0.5, as OpenAI's batch API); a fine-tuning job's trained tokens cost `training`. A
model not listed costs `default` (default: nothing).

Fine-tuning is metered when its job has succeeded: the writer finds succeeded jobs with no usage row
(every TUNING_SCAN_S, and before every usage read), writes one row each (its `ref` the job id, unique,
so two replicas never meter a job twice) and charges the key's budget then: training is not reserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter

from ember.gateway import budgets
from ember.store.db import Store, jobs, now
from ember.store.keys import usage

log = logging.getLogger(__name__)

BATCH_ROWS = 256
TUNING_SCAN_S = 5.0
PER_MILLION = 1e6


@dataclass(frozen=True)
class Price:
    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None
    training: float = 0.0

    def cost(self, prompt: int, cached: int, completion: int) -> float:
        cached_price = self.input if self.cached_input is None else self.cached_input
        return (
            (prompt - cached) * self.input + cached * cached_price + completion * self.output
        ) / PER_MILLION


@dataclass
class PriceTable:
    models: dict[str, Price] = field(default_factory=dict)
    default: Price = field(default_factory=Price)
    batch_discount: float = 0.5

    @classmethod
    def parse(cls, data: dict) -> PriceTable:
        def price(where: str, spec) -> Price:
            if not isinstance(spec, dict) or set(spec) - {"input", "output", "cached_input", "training"}:
                raise ValueError(
                    f"prices: {where} must be {{input, output, cached_input, training}} in USD per 1M tokens"
                )
            if any(isinstance(v, bool) or not isinstance(v, int | float) or v < 0 for v in spec.values()):
                raise ValueError(f"prices: {where}: prices must be non-negative numbers")
            return Price(**spec)

        unknown = set(data) - {"models", "default", "batch_discount"}
        if unknown:
            raise ValueError(
                f"prices: unknown field '{sorted(unknown)[0]}'; known: models, default, batch_discount"
            )
        discount = data.get("batch_discount", 0.5)
        if isinstance(discount, bool) or not isinstance(discount, int | float) or not 0 <= discount <= 1:
            raise ValueError("prices: batch_discount must be a number in [0, 1]")
        models = {name: price(f"models.{name}", spec) for name, spec in (data.get("models") or {}).items()}
        return cls(models, price("default", data.get("default", {})), float(discount))

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        return cls.parse(data)

    def cost(self, model: str, prompt: int, cached: int, completion: int, batch: bool) -> float:
        cost = self.models.get(model, self.default).cost(prompt, cached, completion)
        return cost * self.batch_discount if batch else cost

    def training_cost(self, model: str, tokens: int) -> float:
        return tokens * self.models.get(model, self.default).training / PER_MILLION


@dataclass
class Metered:
    """One finished request, waiting for the writer."""

    tenant: str | None
    key_id: str | None
    team: str | None
    model: str
    endpoint: str
    batch: bool
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost: float
    status: int
    created_at: int = field(default_factory=now)
    trained_tokens: int = 0
    ref: str | None = None
    # The budget reservation to settle: (key id, period, reserved, spent), or None.
    settle: tuple[str, str, float, float] | None = None


_COUNTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def counters(registry: CollectorRegistry) -> dict[str, Counter]:
    """The usage series of one metrics registry (made once: several apps may share an engine)."""
    found = _COUNTERS.get(registry)
    if found is None:
        labels = ("key_id", "team", "model")
        found = {
            "requests": Counter(
                "ember:usage_requests",
                "Metered requests, by key id, team and model.",
                labels,
                registry=registry,
            ),
            "tokens": Counter(
                "ember:usage_tokens",
                "Metered tokens by kind (prompt, cached, completion); cached ones are part of prompt.",
                (*labels, "kind"),
                registry=registry,
            ),
            "cost": Counter("ember:usage_cost_usd", "Metered cost in USD.", labels, registry=registry),
            "refused": Counter(
                "ember:usage_refused_requests",
                "Requests refused by a key's limits, by key id and code.",
                ("key_id", "code"),
                registry=registry,
            ),
        }
        _COUNTERS[registry] = found
    return found


class Meter:
    """The usage queue and its writer (a Service started with the app)."""

    def __init__(
        self, store: Store, registry: CollectorRegistry, keys, prices: PriceTable, flush_ms: int = 200
    ):
        self.store = store
        self.keys = keys  # ember.gateway.keys.KeyRing: a job's key, by its owner id
        self.prices = prices
        self._scanned = 0.0
        self.series = counters(registry)
        self.flush_s = flush_ms / 1000
        self._queue: list[Metered] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._writing = asyncio.Lock()  # a reader's flush waits for the writer's batch in progress

    def record(self, row: Metered) -> None:
        """Queue one row and count it (never blocks). A request that failed after admission only settles
        its reservation."""
        self._queue.append(row)
        if self._wake is not None and len(self._queue) >= BATCH_ROWS:
            self._wake.set()
        if row.status == 200:
            self._count(row)

    def _count(self, row: Metered) -> None:
        labels = (row.key_id or "", row.team or "", row.model)
        s = self.series
        s["requests"].labels(*labels).inc()
        s["tokens"].labels(*labels, "prompt").inc(row.prompt_tokens)
        s["tokens"].labels(*labels, "cached").inc(row.cached_tokens)
        s["tokens"].labels(*labels, "completion").inc(row.completion_tokens)
        if row.trained_tokens:
            s["tokens"].labels(*labels, "trained").inc(row.trained_tokens)
        s["cost"].labels(*labels).inc(row.cost)

    def refused(self, key_id: str, code: str) -> None:
        self.series["refused"].labels(key_id, code).inc()

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._writing = asyncio.Lock()  # made in the app's event loop
        self._stopping = False
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Write what is queued and end the writer. It is asked to stop, not cancelled: a cancel that
        meets a wake-up can be lost in asyncio.wait_for (Python < 3.12) and the writer would run on."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            await self._task
            self._task = None
        await self.flush()

    async def flush(self, jobs: bool = False) -> None:
        """Write everything queued (the usage routes call it before they read, `jobs` too)."""
        async with self._writing:
            if jobs or time.monotonic() - self._scanned >= TUNING_SCAN_S:
                self._scanned = time.monotonic()
                try:
                    for row in await asyncio.to_thread(self._meter_jobs):
                        self._count(row)
                except Exception:
                    log.exception("metering fine-tuning jobs failed; the next scan retries")
            while self._queue:
                rows, self._queue = self._queue[:BATCH_ROWS], self._queue[BATCH_ROWS:]
                try:
                    await asyncio.to_thread(self._write, rows)
                except Exception:
                    log.exception("writing %d usage rows failed; they are dropped", len(rows))

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            self._wake.clear()
            await self.flush()

    def _write(self, rows: list[Metered]) -> None:
        served = [{k: v for k, v in vars(r).items() if k != "settle"} for r in rows if r.status == 200]
        with self.store.tx() as conn:
            if served:
                conn.execute(usage.insert(), served)
            for r in rows:
                if r.settle is not None:
                    budgets.settle(conn, *r.settle)

    def _meter_jobs(self) -> list[Metered]:
        """One usage row for each succeeded fine-tuning job that has none; the rows written."""
        metered = sa.select(usage.c.ref).where(usage.c.ref.is_not(None))
        query = sa.select(jobs).where(
            jobs.c.status == "succeeded", jobs.c.trained_tokens.is_not(None), jobs.c.id.not_in(metered)
        )
        with self.store.engine.connect() as conn:
            found = conn.execute(query.order_by(jobs.c.seq).limit(BATCH_ROWS)).all()
        written = []
        for job in found:
            key = self.keys.by_tenant(job.tenant)
            tokens = int(job.trained_tokens)
            row = Metered(
                tenant=job.tenant,
                key_id=key.id if key is not None else job.tenant,
                team=key.team if key is not None else None,
                model=job.model,
                endpoint="/v1/fine_tuning/jobs",
                batch=False,
                prompt_tokens=0,
                cached_tokens=0,
                completion_tokens=0,
                cost=self.prices.training_cost(job.model, tokens),
                status=200,
                trained_tokens=tokens,
                ref=job.id,
            )
            try:
                with self.store.tx() as conn:
                    conn.execute(
                        usage.insert().values(**{k: v for k, v in vars(row).items() if k != "settle"})
                    )
                    if key is not None and key.budget is not None:
                        period = budgets.period_of(key.budget_period)
                        budgets.ensure(conn, key.id, period)
                        spent = row.cost if key.budget_unit == "usd" else float(tokens)
                        budgets.settle(conn, key.id, period, 0.0, spent)
            except sa.exc.IntegrityError:  # another replica metered it first
                continue
            written.append(row)
        return written
