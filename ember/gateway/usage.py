"""Usage metering: every request admitted on a metered endpoint becomes one `usage` row (prompt, cached
and output tokens, its cost from the price table) and counts in the Prometheus series, labelled by key
id (never the key), team and model. Rows are queued in memory and written in batches by a Service, off
the request path, as ember.traces.recorder writes traces; the same transaction settles the request's
budget reservation (ember.gateway.budgets). A clean stop writes everything queued.

Prices (`--prices FILE`, JSON or YAML), in USD per million tokens:

    {"models": {"smollm2-135m-instruct": {"input": 0.1, "cached_input": 0.05, "output": 0.2}},
     "default": {"input": 0, "output": 0}, "batch_discount": 0.5}

Cached prompt tokens cost `cached_input` (default: `input`); a batch line costs `batch_discount` times
its price (default 0.5, as OpenAI's batch API). A model not listed costs `default` (default: nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from ember.gateway import budgets
from ember.store.db import Store, now
from ember.store.keys import usage

log = logging.getLogger(__name__)

BATCH_ROWS = 256
PER_MILLION = 1e6


@dataclass(frozen=True)
class Price:
    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None

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
            if not isinstance(spec, dict) or set(spec) - {"input", "output", "cached_input"}:
                raise ValueError(
                    f"prices: {where} must be {{input, output, cached_input}} in USD per 1M tokens"
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

    def __init__(self, store: Store, registry: CollectorRegistry, flush_ms: int = 200):
        self.store = store
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
        if row.status != 200:
            return
        labels = (row.key_id or "", row.team or "", row.model)
        s = self.series
        s["requests"].labels(*labels).inc()
        s["tokens"].labels(*labels, "prompt").inc(row.prompt_tokens)
        s["tokens"].labels(*labels, "cached").inc(row.cached_tokens)
        s["tokens"].labels(*labels, "completion").inc(row.completion_tokens)
        s["cost"].labels(*labels).inc(row.cost)

    def refused(self, key_id: str, code: str) -> None:
        self.series["refused"].labels(key_id, code).inc()

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def flush(self) -> None:
        """Write everything queued (the usage routes call it before they read)."""
        async with self._writing:
            while self._queue:
                rows, self._queue = self._queue[:BATCH_ROWS], self._queue[BATCH_ROWS:]
                try:
                    await asyncio.to_thread(self._write, rows)
                except Exception:
                    log.exception("writing %d usage rows failed; they are dropped", len(rows))

    async def _run(self) -> None:
        while True:
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
