"""Prometheus metrics with the names and meanings vLLM users know, prefixed `ember:`.

Each AsyncEngine owns a registry (tests run several servers in one process); the server exposes it at
/metrics next to its HTTP counters. Every series carries a `model_name` label, as vLLM's do, so that one
dashboard tells deployments apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.registry import Collector

disable_created_metrics()  # the `_created` series are noise for these counters


class _ModelLabel(Collector):
    """The metrics of `inner` with `model_name` added to every sample at scrape time: a constant label,
    which prometheus_client lacks, so the code that counts never has to pass it."""

    def __init__(self, inner: CollectorRegistry, owner: EngineMetrics):
        self.inner = inner
        self.owner = owner

    def collect(self):
        name = self.owner.model_name
        for family in self.inner.collect():
            family.samples = [s._replace(labels={"model_name": name, **s.labels}) for s in family.samples]
            yield family


_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_LONG_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class EngineMetrics:
    """`registry` is what /metrics exposes; the series are counted in a private one underneath."""

    def __init__(self, registry: CollectorRegistry | None = None, model_name: str = ""):
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name  # the server sets the name clients use
        r = self._counted = CollectorRegistry()
        self.registry.register(_ModelLabel(r, self))
        self.num_requests_running = Gauge(
            "ember:num_requests_running", "Requests with a sample in the running batch.", registry=r
        )
        self.num_requests_waiting = Gauge(
            "ember:num_requests_waiting", "Requests waiting to be scheduled.", registry=r
        )
        self.kv_cache_usage_perc = Gauge(
            "ember:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).", registry=r
        )
        self.num_preemptions = Counter(
            "ember:num_preemptions",
            "Sequences preempted (recomputed later) for lack of KV blocks.",
            registry=r,
        )
        self.prompt_tokens = Counter("ember:prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("ember:generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(
            "ember:request_success", "Finished requests, by finish reason.", ["finished_reason"], registry=r
        )
        self.time_to_first_token = Histogram(
            "ember:time_to_first_token_seconds",
            "Arrival to first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "ember:inter_token_latency_seconds",
            "Time between successive generated tokens of a request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            "ember:e2e_request_latency_seconds", "Arrival to finish.", buckets=_LONG_BUCKETS, registry=r
        )
        self.request_queue_time = Histogram(
            "ember:request_queue_time_seconds",
            "Arrival to first scheduled.",
            buckets=_LONG_BUCKETS,
            registry=r,
        )
        # Counted in tokens, as vLLM counts them: hits / queries is the prefix cache's hit rate.
        self.prefix_cache_queries = Counter(
            "ember:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_cache_hits = Counter(
            "ember:prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r
        )
        self.lora_requests = Counter(
            "ember:lora_requests",
            "Finished requests served with a LoRA adapter, by adapter.",
            ["adapter"],
            registry=r,
        )
        self.lora_generation_tokens = Counter(
            "ember:lora_generation_tokens",
            "Tokens generated with a LoRA adapter, by adapter.",
            ["adapter"],
            registry=r,
        )
        # Speculative decoding, as vLLM names them: accepted / draft is the acceptance rate, and
        # emitted / (emitted - accepted) the mean tokens a speculative step yields.
        self.spec_decode_num_draft_tokens = Counter(
            "ember:spec_decode_num_draft_tokens", "Tokens proposed by speculative decoding.", registry=r
        )
        self.spec_decode_num_accepted_tokens = Counter(
            "ember:spec_decode_num_accepted_tokens",
            "Proposed tokens the target model accepted.",
            registry=r,
        )
        self.spec_decode_num_emitted_tokens = Counter(
            "ember:spec_decode_num_emitted_tokens",
            "Tokens emitted by speculative steps: the accepted ones plus one from the target per step.",
            registry=r,
        )
        self.http_requests = Counter(
            "ember:http_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.provider_calls = Counter(
            "ember:provider_calls",
            "Calls to --provider upstreams by provider and outcome: ok, error (an error answer), unreachable "
            "(no answer), cooling (skipped: the provider is cooling down).",
            ["provider", "outcome"],
            registry=r,
        )
        self._seen = {"preemptions": 0, "queries": 0, "hits": 0, "draft": 0, "accepted": 0, "emitted": 0}

    def set_stats(
        self,
        running: int,
        waiting: int,
        kv_usage: float,
        preemptions: int,
        queries: int = 0,
        hits: int = 0,
        spec: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        """Gauges as they stand; counters from the core's cumulative totals (`spec`: draft, accepted and
        emitted tokens of speculative decoding)."""
        self.num_requests_running.set(running)
        self.num_requests_waiting.set(waiting)
        self.kv_cache_usage_perc.set(kv_usage)
        for name, total, counter in (
            ("preemptions", preemptions, self.num_preemptions),
            ("queries", queries, self.prefix_cache_queries),
            ("hits", hits, self.prefix_cache_hits),
            ("draft", spec[0], self.spec_decode_num_draft_tokens),
            ("accepted", spec[1], self.spec_decode_num_accepted_tokens),
            ("emitted", spec[2], self.spec_decode_num_emitted_tokens),
        ):
            if total > self._seen[name]:
                counter.inc(total - self._seen[name])
                self._seen[name] = total
