"""Cache-hit fraction of prompt tokens on a multi-tenant shared-prefix workload: 2 replicas behind the
prefix router vs 1 replica vs 2 round-robin.

Each replica is the engine's own KV block pool (ember.engine.kv_cache.KVCacheManager: lookup, admit,
commit, free, LRU eviction of cached blocks), and the router is ember.serve_ray.routing.PrefixRouter fed
what a replica reports (its cached block keys, its load) after every wave of concurrent requests, as a Ray
replica's routing stats are. What is measured is the routing policy and the real cache mechanics; no model
runs, so the numbers are exact and repeatable for a seed.

    PYTHONPATH=$PWD python benchmarks/ray_routing.py  [--tenants 16 --requests 640 --pool-blocks 640]
"""

from __future__ import annotations

import argparse
import itertools
import random

from ember.engine.kv_cache import KVCacheManager, root_hash
from ember.engine.sequence import Request, Sequence
from ember.sampling_params import SamplingParams
from ember.serve_ray.routing import PrefixRouter, ReplicaReport, RouteRequest, block_key, prompt_keys


def workload(tenants: int, requests: int, prefix: int, suffix: tuple[int, int], seed: int):
    """(namespace, prompt ids): each tenant has a system prompt of `prefix` tokens its requests share,
    then a question of its own; tenants' traffic interleaves at random."""
    rng = random.Random(seed)
    systems = [[rng.randrange(100, 30000) for _ in range(prefix)] for _ in range(tenants)]
    out = []
    for _ in range(requests):
        t = rng.randrange(tenants)
        question = [rng.randrange(100, 30000) for _ in range(rng.randint(*suffix))]
        out.append((f"tenant-{t}".encode(), systems[t] + question))
    return out


class Replica:
    """One engine's KV pool: a request takes its cached prefix, computes the rest, and frees its blocks
    when it finishes (they stay cached until evicted)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.kv = KVCacheManager(num_blocks, block_size)
        self.kv.pool.cache_events = []
        self.blocks: set[int] = set()
        self.running: list[Sequence] = []

    def start(self, namespace: bytes, ids: list[int]) -> None:
        request = Request("r", None, ids, SamplingParams(max_tokens=1), len(ids) + 1)
        request.cache_root = root_hash(namespace, None)
        seq = Sequence(request, 0, list(ids), None)
        hits = self.kv.lookup(seq)
        if not self.kv.admit(seq, hits, len(ids) - len(hits) * self.kv.block_size):
            raise RuntimeError("the pool is too small for one wave; raise --pool-blocks")
        seq.num_computed_tokens = len(ids)
        self.kv.commit(seq)
        self.running.append(seq)

    def finish_all(self) -> None:
        for seq in self.running:
            self.kv.free(seq)
        self.running = []
        for h, cached in self.kv.pool.take_cache_events():
            (self.blocks.add if cached else self.blocks.discard)(block_key(h))

    @property
    def hit_fraction(self) -> tuple[int, int]:
        return self.kv.prefix_hits, self.kv.prefix_queries


def replay(policy: str, n_replicas: int, reqs, args, pool_blocks: int | None = None) -> float:
    replicas = [Replica(pool_blocks or args.pool_blocks, args.block_size) for _ in range(n_replicas)]
    router = PrefixRouter(rng=random.Random(args.seed))
    turn = itertools.cycle(range(n_replicas))
    for w in range(0, len(reqs), args.wave):
        for namespace, ids in reqs[w : w + args.wave]:
            if policy == "round-robin":
                i = next(turn)
            else:
                route = RouteRequest(prompt_keys(ids, args.block_size, namespace))
                i = router.choose(list(range(n_replicas)), route)
                router.sent(i, route)
            replicas[i].start(namespace, ids)
        for i, r in enumerate(replicas):  # the wave ends; each replica reports, as its stats poll would
            r.finish_all()
            router.report(i, ReplicaReport(blocks=set(r.blocks)))
            router.replicas[i].recent.clear()
            router.replicas[i].in_flight = 0
    hits = sum(r.kv.prefix_hits for r in replicas)
    queries = sum(r.kv.prefix_queries for r in replicas)
    return hits / queries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, default=16)
    p.add_argument("--requests", type=int, default=640)
    p.add_argument("--prefix", type=int, default=1024, help="tokens of each tenant's shared system prompt")
    p.add_argument("--suffix", type=int, nargs=2, default=(32, 160), help="question tokens, min max")
    p.add_argument("--pool-blocks", type=int, default=768, help="KV blocks per replica")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--wave", type=int, default=8, help="requests in flight between two reports")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    reqs = workload(args.tenants, args.requests, args.prefix, tuple(args.suffix), args.seed)
    single = replay("router", 1, reqs, args)
    big = replay("router", 1, reqs, args, 2 * args.pool_blocks)
    routed = replay("router", 2, reqs, args)
    rr = replay("round-robin", 2, reqs, args)
    print(
        f"{args.tenants} tenants, {args.requests} requests, prefix {args.prefix} tokens, "
        f"{args.pool_blocks} blocks x {args.block_size} tokens per replica"
    )
    print("| setup | prompt tokens from cache |")
    print("| --- | --- |")
    print(f"| 1 replica | {single:.1%} |")
    print(f"| 1 replica, twice the blocks (the memory of two) | {big:.1%} |")
    print(f"| 2 replicas, prefix router | {routed:.1%} |")
    print(f"| 2 replicas, round-robin | {rr:.1%} |")
    print(
        f"router / single = {routed / single:.2f}, router / single of twice the blocks = {routed / big:.2f} "
        f"(>= 0.90), router / round-robin = {routed / rr:.2f} (>= 1.5)"
    )


if __name__ == "__main__":
    main()
