"""vLLM's serving metrics on hand-built request timelines, where every expected value is known."""

from __future__ import annotations

import numpy as np
import pytest

from ember.bench.serving.client import RequestRecord
from ember.bench.serving.metrics import Stats, compute_metrics, good_requests, latencies, tpot


def _done(rid: str, ttft: float, itl: list[float], output_tokens: int, input_tokens: int) -> RequestRecord:
    # E2EL ends at the last token chunk: the first chunk plus every gap after it.
    return RequestRecord(
        rid,
        "m",
        ttft=ttft,
        itl=itl,
        e2el=ttft + sum(itl),
        output_tokens=output_tokens,
        input_tokens=input_tokens,
        num_chunks=len(itl) + 1,
    )


@pytest.fixture
def records() -> list[RequestRecord]:
    return [
        # TTFT 100 ms, E2EL 200 ms, 4 tokens: TPOT = 100 ms / 3
        _done("a", 0.100, [0.020, 0.030, 0.050], output_tokens=4, input_tokens=10),
        # TTFT 200 ms, nine 10 ms gaps, 10 tokens: TPOT = 90 ms / 9 = 10 ms, E2EL 290 ms
        _done("b", 0.200, [0.010] * 9, output_tokens=10, input_tokens=20),
        # one output token: no TPOT, but its TTFT and E2EL count
        _done("c", 0.050, [], output_tokens=1, input_tokens=30),
        # failed: its partial timings and tokens must count nowhere
        RequestRecord(
            "d",
            "m",
            ttft=0.001,
            itl=[0.5],
            e2el=0.501,
            output_tokens=99,
            input_tokens=99,
            error="HTTP 500: x",
        ),
    ]


def test_per_request_latencies(records):
    lat = latencies(records)
    assert lat["ttft"] == pytest.approx([0.100, 0.200, 0.050])
    assert lat["e2el"] == pytest.approx([0.200, 0.290, 0.050])
    assert lat["tpot"] == pytest.approx([0.100 / 3, 0.010])
    assert lat["itl"] == pytest.approx([0.020, 0.030, 0.050] + [0.010] * 9)
    assert tpot(records[2]) is None and tpot(records[3]) is None


def test_counts_tokens_and_throughputs_from_a_fixed_duration(records):
    m = compute_metrics(records, duration=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input, m.total_output) == (60, 15)
    assert m.request_throughput == pytest.approx(3 / 2.0)
    assert m.output_throughput == pytest.approx(15 / 2.0)
    assert m.total_token_throughput == pytest.approx(75 / 2.0)
    assert m.goodput is None
    assert m.usage_fallbacks == 0


def test_latency_stats_in_ms_match_numpy(records):
    m = compute_metrics(records, duration=1.0)
    ttft_ms = np.array([100.0, 200.0, 50.0])
    assert m.ttft.mean == pytest.approx(ttft_ms.mean())
    assert m.ttft.median == pytest.approx(100.0)
    assert m.ttft.p90 == pytest.approx(np.percentile(ttft_ms, 90))
    assert m.ttft.p99 == pytest.approx(np.percentile(ttft_ms, 99))
    # linear interpolation between 100 and 200 at rank 0.9*2 = 1.8
    assert m.ttft.p90 == pytest.approx(180.0)
    assert m.tpot.mean == pytest.approx((100 / 3 + 10) / 2)
    assert m.itl.median == pytest.approx(10.0)
    assert m.e2el.p99 == pytest.approx(np.percentile([200.0, 290.0, 50.0], 99))


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_stats_equal_numpy_on_random_samples(n):
    x = np.random.default_rng(n).exponential(0.05, size=n)
    s = Stats.of(list(x))
    ms = x * 1000
    assert s.mean == pytest.approx(ms.mean())
    assert s.median == pytest.approx(np.median(ms))
    assert s.std == pytest.approx(ms.std())
    assert s.p90 == pytest.approx(np.percentile(ms, 90, method="linear"))
    assert s.p99 == pytest.approx(np.percentile(ms, 99, method="linear"))


@pytest.mark.parametrize(
    ("slos", "good"),
    [
        ({"ttft": 150}, {"a", "c"}),
        ({"ttft": 100}, {"a", "c"}),  # at the SLO is within it
        ({"ttft": 99.9}, {"c"}),
        ({"tpot": 20}, {"b", "c"}),  # one output token: TPOT 0, as vLLM counts it
        ({"e2el": 250}, {"a", "c"}),
        ({"ttft": 150, "tpot": 20}, {"c"}),
        ({"ttft": 1000, "tpot": 1000, "e2el": 1000}, {"a", "b", "c"}),  # never the failed one
        ({"ttft": 1}, set()),
    ],
)
def test_goodput_counts_exactly_the_requests_within_every_slo(records, slos, good):
    assert good_requests(records, slos) == len(good)
    m = compute_metrics(records, duration=4.0, goodput=slos)
    assert m.goodput == pytest.approx(len(good) / 4.0)


def test_all_failed_gives_empty_stats_and_zero_throughput():
    failed = [RequestRecord(str(i), "m", error="HTTP 404: no such model") for i in range(3)]
    m = compute_metrics(failed, duration=1.0, goodput={"ttft": 100})
    assert (m.completed, m.failed, m.total_output) == (0, 3, 0)
    assert m.request_throughput == 0 and m.output_throughput == 0 and m.goodput == 0
    assert m.ttft == Stats() and m.itl.mean is None


def test_counts_requests_whose_tokens_came_from_chunks(records):
    records[0].tokens_from_usage = False
    records[3].tokens_from_usage = False  # failed: not counted
    assert compute_metrics(records, duration=1.0).usage_fallbacks == 1


def test_rejects_a_non_positive_duration(records):
    with pytest.raises(ValueError, match="duration"):
        compute_metrics(records, duration=0.0)
