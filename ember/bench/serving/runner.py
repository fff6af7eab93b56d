"""Send a workload on schedule and collect what each request did: arrivals, the concurrency cap, chat
sessions that wait for their previous turn, warm-up, and a sweep over concurrency levels."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ember.bench.serving.client import RequestRecord, make_client, request_body, send
from ember.bench.serving.config import BenchConfig
from ember.bench.serving.metrics import Metrics, compute_metrics
from ember.bench.serving.workloads import Request, build_workload

WARMUP_PROMPT = "Count from one to twenty, one number per line."
_ARRIVALS_STREAM = 1  # keeps the arrival draws apart from the workload's, which use the bare seed


class BenchError(RuntimeError):
    """The run could not be made (the server refused the warm-up); the message says what to check."""


@dataclass
class BenchResult:
    config: BenchConfig
    seed: int
    requests: list[Request]  # the workload, as sent
    records: list[RequestRecord]  # one per request, same order
    metrics: Metrics
    started_at: str  # ISO 8601, UTC


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds from the start at which each request arrives, as vLLM's `get_request` schedules them.

    Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate whatever the shape, with
    burstiness 1 the exponential gaps of a Poisson process, < 1 burstier, > 1 more even. The sum of
    random gaps misses n/rate by a percent or two, which would move throughput from seed to seed, so
    the schedule is stretched to end exactly at n/rate.
    """
    if math.isinf(rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps)
    return times * ((n / rate) / times[-1])


def fresh_seed() -> int:
    return secrets.randbits(31)


def run_benchmark(config: BenchConfig, requests: list[Request] | None = None) -> BenchResult:
    """One run. The workload is built from `config.workload` unless `requests` are given; its seed is
    `config.workload.seed`, or a fresh one (recorded in the result) when that is None."""
    seed = config.workload.seed if config.workload.seed is not None else fresh_seed()
    if requests is None:
        requests = build_workload(config.workload, config.model, config.endpoint, seed)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    records, duration = asyncio.run(_run(config, requests, seed))
    metrics = compute_metrics(records, duration, config.goodput)
    return BenchResult(config, seed, requests, records, metrics, started_at)


def run_sweep(config: BenchConfig, levels: list[int | None]) -> list[BenchResult]:
    """One run per concurrency level, in order. Each level gets its own prompts (seed + i), so no level
    finds the previous level's prompts in the server's prefix cache."""
    base = config.workload.seed if config.workload.seed is not None else fresh_seed()
    results = []
    for i, level in enumerate(levels):
        workload = dataclasses.replace(config.workload, seed=base + i)
        results.append(run_benchmark(dataclasses.replace(config, max_concurrency=level, workload=workload)))
    return results


async def _run(cfg: BenchConfig, requests: list[Request], seed: int) -> tuple[list[RequestRecord], float]:
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    bodies = [request_body(r, cfg.endpoint, cfg.temperature, cfg.ignore_eos) for r in requests]
    offsets = arrival_offsets(
        len(requests), cfg.request_rate, cfg.burstiness, np.random.default_rng((seed, _ARRIVALS_STREAM))
    )
    after = _previous_turns(requests)
    done = [asyncio.Event() for _ in requests]
    gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else contextlib.nullcontext()
    records = [RequestRecord(r.id, r.model, input_tokens=r.input_len or 0) for r in requests]

    async with make_client(cfg.base_url, cfg.api_key, cfg.max_concurrency or len(requests)) as client:
        await _warmup(client, cfg, path)
        with _progress(cfg, len(requests)) as (progress, task):

            async def one(i: int) -> None:
                try:
                    if after[i] is not None:  # a chat turn goes out once the turn before it is answered
                        await done[after[i]].wait()
                    async with gate:
                        await send(client, path, bodies[i], records[i], start)
                finally:
                    done[i].set()
                    progress.advance(task)

            start = time.perf_counter()
            tasks = []
            for i in range(len(requests)):
                delay = start + offsets[i] - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
    return records, duration


def _previous_turns(requests: list[Request]) -> list[int | None]:
    """For each request, the index of the previous request of its chat session (None: not waiting)."""
    last: dict[str, int] = {}
    after: list[int | None] = []
    for i, r in enumerate(requests):
        after.append(last.get(r.session_id) if r.session_id is not None else None)
        if r.session_id is not None:
            last[r.session_id] = i
    return after


async def _warmup(client, cfg: BenchConfig, path: str) -> None:
    """Untimed requests first, as vLLM's initial test run: the first request's one-off costs stay out of
    the numbers, and a wrong URL, model or key stops the run with the server's own message."""
    if not cfg.warmup:
        return
    request = Request("warmup", 8, cfg.model, prompt=WARMUP_PROMPT)
    body = request_body(request, cfg.endpoint, cfg.temperature, cfg.ignore_eos)
    records = [RequestRecord(f"warmup-{i}", cfg.model) for i in range(cfg.warmup)]
    await asyncio.gather(*(send(client, path, body, r, time.perf_counter()) for r in records))
    failed = [r for r in records if not r.success]
    if failed:
        raise BenchError(
            f"warm-up request to {cfg.base_url}{path} (model '{cfg.model}') failed: {failed[0].error}; "
            "check --base-url, --model and --api-key (or pass --warmup 0 to record failures instead)"
        )


@contextlib.contextmanager
def _progress(cfg: BenchConfig, total: int):
    label = f"{cfg.endpoint} c={cfg.max_concurrency or '∞'} rate={cfg.request_rate:g}"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not cfg.progress, transient=False) as progress:
        yield progress, progress.add_task(label, total=total)
