"""Measure a configuration for real: start `ember serve --config` with its DeploymentSpec, send the
workload on its own arrival times through the benchmark's client (ember.bench.serving.client), and
score the records as the predictions are scored (ember.optimize.simulate.summarize)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ember.bench.serving.client import RequestRecord, make_client, request_body, send
from ember.bench.serving.metrics import tpot
from ember.bench.serving.workloads import Request
from ember.config import DeploymentSpec, EngineConfig, ServerConfig
from ember.optimize.simulate import summarize
from ember.optimize.workload import Workload

SERVED_NAME = "optimize"
_WARMUP = "Count from one to ten."


class ReplayError(RuntimeError):
    """The server for a configuration did not come up or refused the workload; says which and why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(config: EngineConfig, path: Path) -> DeploymentSpec:
    spec = DeploymentSpec(engine=config, server=ServerConfig(embedding_model=None, log_level="warning"))
    path.parent.mkdir(parents=True, exist_ok=True)
    spec.dump(path)
    return spec


@contextlib.contextmanager
def serving(spec_path: Path, log_path: Path, timeout: float = 600.0):
    """`ember serve --config spec_path` on a free loopback port until the block ends; yields its URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--config", str(spec_path), "--port", str(port)]
    cmd += ["--served-model-name", SERVED_NAME]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ReplayError(
                    f"ember serve --config {spec_path} exited ({proc.returncode}); see {log_path}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ReplayError(
                    f"ember serve --config {spec_path} not ready in {timeout:.0f} s; see {log_path}"
                )
            time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _send_all(url: str, workload: Workload) -> tuple[list[RequestRecord], float]:
    requests = [Request(i.id, i.max_tokens, SERVED_NAME, prompt=i.prompt) for i in workload.items]
    bodies = [request_body(r, "completions", 0.0, True) for r in requests]
    records = [RequestRecord(r.id, SERVED_NAME) for r in requests]
    async with make_client(url, None, len(requests) + 2) as client:
        warm = request_body(Request("warmup", 4, SERVED_NAME, prompt=_WARMUP), "completions", 0.0, True)
        probe = await send(
            client, "/v1/completions", warm, RequestRecord("warmup", SERVED_NAME), time.perf_counter()
        )
        if not probe.success:
            raise ReplayError(f"the server refused the warm-up request: {probe.error}")
        start = time.perf_counter()

        async def one(i: int) -> None:
            delay = start + workload.items[i].arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await send(client, "/v1/completions", bodies[i], records[i], start)

        await asyncio.gather(*(one(i) for i in range(len(requests))))
        duration = time.perf_counter() - start
    return records, duration


def replay(
    config: EngineConfig, workload: Workload, slos_ms: dict[str, float], work_dir: Path, name: str
) -> dict:
    """The measured metrics of `config` on `workload` (the names ember.optimize.objective knows)."""
    spec_path = work_dir / f"{name}.yaml"
    write_spec(config, spec_path)
    with serving(spec_path, work_dir / f"{name}.log") as url:
        records, _ = asyncio.run(_send_all(url, workload))
    failed = [r for r in records if not r.success]
    if failed:
        raise ReplayError(f"{len(failed)} of {len(records)} requests failed, e.g. {failed[0].error}")
    ttft = [r.ttft for r in records]
    tpots = [t for t in map(tpot, records) if t is not None]
    good = sum(
        1
        for r in records
        if r.ttft * 1000 <= slos_ms.get("ttft", float("inf"))
        and (tpot(r) or 0.0) * 1000 <= slos_ms.get("tpot", float("inf"))
    )
    # From the first arrival to the last token, as the simulator's clock counts it.
    end = max(r.start_time + r.e2el for r in records)
    out = sum(r.output_tokens for r in records)
    return summarize(ttft, tpots, good, out, end - min(i.arrival for i in workload.items))
