"""What the gateway adds to one request: key lookup, rate limits, budget reservation and metering,
measured at the Gateway (no HTTP, no engine), against SQLite and, with --postgres URL, PostgreSQL.

    PYTHONPATH=. python benchmarks/gateway_admission.py [--n 2000] [--postgres postgresql+psycopg://...]

Prints the mean microseconds per admitted-and-metered request for: an --api-key key (nothing to check),
a virtual key with RPM/TPM limits, and one with a token budget (one conditional UPDATE on admission).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

from prometheus_client import CollectorRegistry

from ember.gateway.guard import Gateway
from ember.protocol.requests import CompletionRequest
from ember.store.db import Store

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 0}}


async def one_kind(gateway: Gateway, tenant: str | None, n: int) -> float:
    body = CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3], "max_tokens": 2})
    await gateway.meter.start()
    started = time.perf_counter()
    for _ in range(n):
        ticket = await gateway.admit("/v1/completions", body, tenant, 0)
        gateway.finish(ticket, USAGE)
    elapsed = time.perf_counter() - started
    await gateway.meter.stop()  # the writer's work is off the request path: not in the time
    return elapsed / n * 1e6


def run(url: str, n: int) -> dict[str, float]:
    gateway = Gateway(Store(url), CollectorRegistry())
    _, limited = gateway.keys.create({"rpm": 10**9, "tpm": 10**12})
    _, budgeted = gateway.keys.create({"budget": 1e12})
    return {
        "--api-key key": asyncio.run(one_kind(gateway, "key-static", n)),
        "virtual key, rpm+tpm": asyncio.run(one_kind(gateway, limited.tenant, n)),
        "virtual key, budget": asyncio.run(one_kind(gateway, budgeted.tenant, n)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--postgres", default=None)
    args = parser.parse_args()
    urls = {"sqlite": f"sqlite:///{tempfile.mkdtemp()}/ember.db"}
    if args.postgres:
        urls["postgresql"] = args.postgres
    for name, url in urls.items():
        for kind, us in run(url, args.n).items():
            print(f"{name:10s} {kind:22s} {us:8.1f} us/request")


if __name__ == "__main__":
    main()
