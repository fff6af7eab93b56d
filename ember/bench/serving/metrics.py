"""Serving metrics from per-request records, defined as vLLM's `calculate_metrics` defines them.

Over completed requests only (a failed request counts in `failed` and nowhere else):
    TTFT  first token chunk - sent
    E2EL  last token chunk - sent
    TPOT  (E2EL - TTFT) / (output_tokens - 1), for requests with output_tokens > 1
    ITL   every gap between successive token chunks, all requests flattened
    throughput = completed, output tokens, (input + output) tokens / duration
    goodput    = requests within every SLO / duration; a request with one output token has TPOT 0 here
Percentiles are numpy's (linear interpolation); times are reported in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ember.bench.serving.client import RequestRecord

LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class Stats:
    """Summary of one latency, in ms; all None when there was nothing to measure."""

    mean: float | None = None
    median: float | None = None
    std: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        if len(seconds) == 0:
            return cls()
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p90, p99 = np.percentile(ms, [90, 99])
        return cls(float(ms.mean()), float(np.median(ms)), float(ms.std()), float(p90), float(p99))


@dataclass
class Metrics:
    completed: int
    failed: int
    duration: float  # s, from the start of the run to the last completion
    total_input: int
    total_output: int
    request_throughput: float  # req/s
    output_throughput: float  # tok/s
    total_token_throughput: float  # tok/s, input + output
    goodput: float | None  # req/s within every SLO; None when no SLO was given
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2el: Stats
    usage_fallbacks: int  # completed requests whose output tokens were counted from chunks, not usage
    total_cached: int = 0  # prompt tokens served from the server's prefix cache, as its usage says

    @property
    def prefix_hit_rate(self) -> float:
        """Share of prompt tokens the server did not have to compute."""
        return self.total_cached / self.total_input if self.total_input else 0.0


def tpot(record: RequestRecord) -> float | None:
    """Seconds per output token after the first; None for one token (or none) or a failed request."""
    if not record.success or record.output_tokens <= 1:
        return None
    assert record.e2el is not None and record.ttft is not None
    return (record.e2el - record.ttft) / (record.output_tokens - 1)


def latencies(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Seconds per completed request for TTFT, TPOT and E2EL, and every ITL gap: what the stats and
    the CDF plots are drawn from."""
    done = [r for r in records if r.success]
    tpots = [t for t in map(tpot, done) if t is not None]
    return {
        "ttft": [r.ttft for r in done],
        "tpot": tpots,
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.e2el for r in done],
    }


def good_requests(records: Sequence[RequestRecord], slos_ms: dict[str, float]) -> int:
    """Completed requests whose TTFT, TPOT and E2EL are each at or under the SLO given for it."""
    good = 0
    for r in records:
        if not r.success:
            continue
        values = {"ttft": r.ttft, "tpot": tpot(r) or 0.0, "e2el": r.e2el}
        if all(values[k] <= ms / 1000.0 for k, ms in slos_ms.items()):
            good += 1
    return good


def compute_metrics(
    records: Sequence[RequestRecord], duration: float, goodput: dict[str, float] | None = None
) -> Metrics:
    """`duration` in seconds; `goodput` maps ttft/tpot/e2el to an SLO in ms (vLLM's --goodput)."""
    if not duration > 0:
        raise ValueError(f"duration must be positive seconds, got {duration}")
    done = [r for r in records if r.success]
    total_input = sum(r.input_tokens for r in done)
    total_output = sum(r.output_tokens for r in done)
    lat = latencies(records)
    return Metrics(
        completed=len(done),
        failed=len(records) - len(done),
        duration=duration,
        total_input=total_input,
        total_output=total_output,
        request_throughput=len(done) / duration,
        output_throughput=total_output / duration,
        total_token_throughput=(total_input + total_output) / duration,
        goodput=good_requests(records, goodput) / duration if goodput else None,
        ttft=Stats.of(lat["ttft"]),
        tpot=Stats.of(lat["tpot"]),
        itl=Stats.of(lat["itl"]),
        e2el=Stats.of(lat["e2el"]),
        usage_fallbacks=sum(1 for r in done if not r.tokens_from_usage),
        total_cached=sum(r.cached_tokens for r in done),
    )
