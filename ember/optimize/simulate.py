"""Predict a configuration by replaying the workload through ember's real Scheduler on a simulated clock.

The scheduler, the KV block pool (prefix cache included) and the speculative planner are the engine's own
objects; only the model is missing. A step takes what the profile says a step of that shape takes
(ember.optimize.profile), and each sequence gains the tokens the model would give it: the workload's
greedy outputs, known in advance (`outputs`), so that n-gram proposals are checked against what the
model really says and speculation is accepted exactly where it would be. Without outputs, a stand-in
token that no proposal matches is used (no speculation pays).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ember.config import EngineConfig
from ember.engine.kv_cache import KVCacheManager, root_hash
from ember.engine.proposers import NgramProposer
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import Request, Sequence
from ember.engine.speculative import Speculator
from ember.optimize.profile import StepModel
from ember.sampling_params import SamplingParams

_NO_MATCH = -1  # a token id no prompt holds


@dataclass
class Timeline:
    """When each request arrived and when each of its tokens came out (s on the simulated clock)."""

    arrivals: list[float]
    tokens: list[list[float]] = field(default_factory=list)
    steps: int = 0
    preemptions: int = 0

    @property
    def duration(self) -> float:
        return max((t[-1] for t in self.tokens if t), default=0.0) - min(self.arrivals, default=0.0)


@dataclass
class SimRequest:
    prompt_ids: list[int]
    max_tokens: int
    arrival: float
    output_ids: list[int] | None = None  # the greedy answer, when known


def simulate(config: EngineConfig, requests: list[SimRequest], cost: StepModel, num_blocks: int) -> Timeline:
    """Run `requests` (sorted by arrival) to completion under `config`'s scheduler, cache and speculation."""
    cc = config.cache
    kv = KVCacheManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
    now = 0.0
    scheduler = Scheduler(config.scheduler, kv, None, clock=lambda: now)
    sc = config.speculative
    spec = Speculator(sc, NgramProposer(sc.ngram_max, sc.ngram_min)) if sc.method == "ngram" else None
    if sc.method == "draft":
        raise ValueError(
            "the simulator predicts n-gram speculation only (a draft model needs its own profile)"
        )
    line = Timeline([r.arrival for r in requests], [[] for _ in requests])
    seqs: dict[Sequence, int] = {}
    pending = 0
    root = root_hash(None, None)
    while pending < len(requests) or scheduler.has_work():
        while pending < len(requests) and requests[pending].arrival <= now:
            r = requests[pending]
            params = SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
            req = Request(f"r{pending}", None, list(r.prompt_ids), params, len(r.prompt_ids) + r.max_tokens)
            req.cache_root = root
            seq = Sequence(req, 0, list(r.prompt_ids), None)
            req.seqs.append(seq)
            scheduler.add(seq)
            seqs[seq] = pending
            pending += 1
        if spec is not None:
            spec.plan(scheduler.running)
        out = scheduler.schedule()
        if out.empty:
            if pending >= len(requests):
                raise RuntimeError("the scheduler stalled with work left: the KV pool cannot hold a request")
            now = max(now, requests[pending].arrival)
            continue
        proposals = spec.propose(out.num_scheduled) if spec is not None else {}
        # What the forward pass computes: a verified sequence its pending token and the proposals, any
        # other what it had pending (a lookahead slot with nothing proposed runs nothing).
        work = {
            s: 1 + len(proposals[s].tokens)
            if s in proposals
            else min(n, s.num_tokens - s.num_computed_tokens)
            for s, n in out.num_scheduled.items()
        }
        tokens = sum(work.values())
        attention = float(sum(n * (s.num_computed_tokens + n) for s, n in work.items()))
        dt = cost.seconds(tokens, len(work), attention)
        now += dt
        line.steps += 1
        scheduler.observe(tokens, dt)
        for seq, n in work.items():
            i = seqs[seq]
            truth = requests[i].output_ids
            if seq in proposals:
                _verify(spec, kv, seq, proposals[seq].tokens, truth, line.tokens[i], now)
            else:
                seq.num_computed_tokens += n
                kv.commit(seq)
                if seq.num_computed_tokens == seq.num_tokens:
                    _emit(seq, _true_token(seq, truth), line.tokens[i], now)
            if seq.num_output_tokens >= requests[i].max_tokens and not seq.finished:
                scheduler.finish(seq)
            elif not seq.finished:
                kv.trim(seq)
    line.preemptions = scheduler.num_preemptions
    return line


def _true_token(seq: Sequence, truth: list[int] | None) -> int:
    k = seq.num_output_tokens
    return truth[k] if truth is not None and k < len(truth) else _NO_MATCH


def _emit(seq: Sequence, token: int, times: list[float], now: float) -> None:
    seq.token_ids.append(token)
    times.append(now)


def _verify(spec, kv, seq: Sequence, proposed: list[int], truth, times: list[float], now: float) -> None:
    """Greedy verification against the known answer: keep the proposals that match it, then the model's
    own next token, as Speculator.verify keeps them."""
    length = seq.num_tokens
    kept = 0
    while kept < len(proposed) and proposed[kept] == _peek(seq, truth, kept):
        kept += 1
    spec._learn(seq, kept, len(proposed))
    seq.num_computed_tokens = length + kept
    for _ in range(kept + 1):
        if seq.num_output_tokens >= seq.request.max_total_tokens - seq.num_prompt_tokens:
            break
        _emit(seq, _true_token(seq, truth), times, now)
    kv.commit(seq)


def _peek(seq: Sequence, truth: list[int] | None, ahead: int) -> int:
    k = seq.num_output_tokens + ahead
    return truth[k] if truth is not None and k < len(truth) else _NO_MATCH


def latency_metrics(line: Timeline, slos_ms: dict[str, float]) -> dict[str, float]:
    """TTFT/TPOT p50/p95 (ms), goodput and throughput, as ember.bench.serving.metrics defines them."""
    ttft, tpot, good, out_tokens = [], [], 0, 0
    for arrival, times in zip(line.arrivals, line.tokens, strict=True):
        if not times:
            continue
        t0 = times[0] - arrival
        tp = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        ttft.append(t0)
        if len(times) > 1:
            tpot.append(tp)
        out_tokens += len(times)
        if t0 * 1000 <= slos_ms.get("ttft", math.inf) and tp * 1000 <= slos_ms.get("tpot", math.inf):
            good += 1
    return summarize(ttft, tpot, good, out_tokens, line.duration)


def summarize(ttft: list[float], tpot: list[float], good: int, out_tokens: int, duration: float) -> dict:
    """Seconds in, the metric names of ember.optimize.objective out (latencies in ms)."""

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(np.asarray(xs) * 1000, q)) if xs else math.nan

    duration = max(duration, 1e-9)
    return {
        "ttft_p50": pct(ttft, 50),
        "ttft_p95": pct(ttft, 95),
        "tpot_p50": pct(tpot, 50),
        "tpot_p95": pct(tpot, 95),
        "goodput": good / duration,
        "throughput": out_tokens / duration,
        "good_fraction": good / max(len(ttft), 1),
        "duration": duration,
        "output_tokens": float(out_tokens),
    }
