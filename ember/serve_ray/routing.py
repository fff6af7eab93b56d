"""Which replica serves a request: the one holding most of its prompt's prefix, or its adapter, unless
that one is overloaded; the less loaded of two random replicas when nothing is cached anywhere.

Pure logic over plain data (no Ray), so it is tested with fakes and replayed by the benchmark. A replica
is known by what it reports (`ReplicaReport`: the prefix-cache blocks it holds, its resident adapters,
its queue and KV use) plus what this router sent it since: blocks of a request routed a moment ago are
counted as held until the next report could have named them (`recent_ttl`), so a burst of requests on a
new prefix does not scatter before the first report arrives.

Block keys are the engine's own chained hashes (ember.engine.kv_cache: the root takes the tenant's cache
namespace and the adapter), cut to their first 8 bytes: a replica reports 8 bytes a block.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from ember.engine.kv_cache import chain_hash, root_hash

KEY_BYTES = 8


def block_key(h: bytes) -> int:
    """The compact name of a block hash, as replicas report it."""
    return int.from_bytes(h[:KEY_BYTES], "little")


def prompt_keys(
    prompt_ids: list[int], block_size: int, namespace: bytes | None, adapter_uid: str | None = None
) -> list[int]:
    """The keys of the prompt's full blocks, as the engine would name them once computed. The engine
    never takes the last token from cache, so a prompt of exactly k blocks can hit at most k - 1."""
    parent = root_hash(namespace, adapter_uid)
    keys = []
    for i in range((len(prompt_ids) - 1) // block_size):
        parent = chain_hash(parent, prompt_ids[i * block_size : (i + 1) * block_size])
        keys.append(block_key(parent))
    return keys


@dataclass
class ReplicaReport:
    """What a replica says of itself (its `record_routing_stats`)."""

    blocks: set[int] = field(default_factory=set)  # block keys in its prefix cache
    adapters: set[str] = field(default_factory=set)  # LoRA adapters loaded
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use


@dataclass
class RouteRequest:
    keys: list[int]  # prompt_keys of the request
    adapter: str | None = None


@dataclass
class _Replica:
    report: ReplicaReport = field(default_factory=ReplicaReport)
    recent: dict[int, float] = field(default_factory=dict)  # block key -> when a request with it was sent
    in_flight: int = 0  # sent by this router and not finished


class PrefixRouter:
    """`balance_abs` / `balance_rel`: the load gap past which the cache is ignored and the least loaded
    replica is taken (SGLang's cache-aware router: both must be exceeded). `kv_full`: KV use past which a
    replica counts as overloaded for its prefix."""

    def __init__(
        self,
        *,
        recent_ttl: float = 10.0,
        balance_abs: int = 8,
        balance_rel: float = 1.5,
        kv_full: float = 0.95,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.recent_ttl = recent_ttl
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.kv_full = kv_full
        self.rng = rng or random.Random()
        self.clock = clock
        self.replicas: dict[Hashable, _Replica] = {}

    # -- what the router hears ----------------------------------------------------------------------

    def report(self, replica: Hashable, report: ReplicaReport) -> None:
        self.replicas.setdefault(replica, _Replica()).report = report

    def forget(self, replica: Hashable) -> None:
        """A replica that died or was scaled down: its cache is gone with it."""
        self.replicas.pop(replica, None)

    def sent(self, replica: Hashable, request: RouteRequest) -> None:
        r = self.replicas.setdefault(replica, _Replica())
        now = self.clock()
        for k in request.keys:
            r.recent[k] = now
        r.in_flight += 1
        if len(r.recent) > 4 * max(len(r.report.blocks), 1024):  # bounded: drop what has expired
            r.recent = {k: t for k, t in r.recent.items() if now - t < self.recent_ttl}

    def finished(self, replica: Hashable) -> None:
        r = self.replicas.get(replica)
        if r is not None and r.in_flight > 0:
            r.in_flight -= 1

    # -- the choice ---------------------------------------------------------------------------------

    def load(self, replica: Hashable) -> int:
        r = self.replicas.get(replica)
        if r is None:
            return 0
        return max(r.in_flight, r.report.num_running + r.report.num_waiting)

    def matched(self, replica: Hashable, keys: list[int]) -> int:
        """Leading blocks of the prompt the replica holds (reported, or sent there lately)."""
        r = self.replicas.get(replica)
        if r is None:
            return 0
        now, n = self.clock(), 0
        for k in keys:
            sent_at = r.recent.get(k)
            if k in r.report.blocks or (sent_at is not None and now - sent_at < self.recent_ttl):
                n += 1
            else:
                break
        return n

    def resident(self, replica: Hashable, adapter: str | None) -> bool:
        r = self.replicas.get(replica)
        return adapter is None or (r is not None and adapter in r.report.adapters)

    def choose(self, candidates: list[Hashable], request: RouteRequest | None) -> Hashable:
        """The replica for `request` (None: nothing known of it, as for a non-generation call)."""
        if not candidates:
            raise ValueError("no replica to route to")
        if len(candidates) == 1:
            return candidates[0]
        loads = {c: self.load(c) for c in candidates}
        lo, hi = min(loads.values()), max(loads.values())
        if request is None or (hi - lo > self.balance_abs and hi > self.balance_rel * max(lo, 1)):
            return self.two_choices(candidates, loads)
        fits = [c for c in candidates if not self._kv_full(c)] or candidates
        scored = {c: self._score(c, request) for c in fits}
        best = max(scored.values())
        if best <= (0, 0):  # nothing of it cached anywhere, nor its adapter singled out
            return self.two_choices(fits, loads)
        top = [c for c in fits if scored[c] == best]
        return min(top, key=lambda c: (loads[c], self.rng.random()))

    def _score(self, replica: Hashable, request: RouteRequest) -> tuple[int, int]:
        """(adapter resident where not all have it, matched blocks): the adapter first, as a replica
        without it must load it before it can even start."""
        adapter = request.adapter is not None and self.resident(replica, request.adapter)
        return (int(adapter), self.matched(replica, request.keys))

    def _kv_full(self, replica: Hashable) -> bool:
        r = self.replicas.get(replica)
        return r is not None and r.report.kv_usage >= self.kv_full

    def two_choices(self, candidates: list[Hashable], loads: dict[Hashable, int] | None = None) -> Hashable:
        """The less loaded of two replicas picked at random."""
        a, b = self.rng.sample(candidates, 2) if len(candidates) > 1 else (candidates[0],) * 2
        la, lb = (loads or {}).get(a, self.load(a)), (loads or {}).get(b, self.load(b))
        return a if la <= lb else b
