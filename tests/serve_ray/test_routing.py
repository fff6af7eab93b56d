"""The prefix router's choices, on fake replicas (no Ray)."""

import random

from ember.engine.kv_cache import KVCacheManager, root_hash
from ember.engine.sequence import Request, Sequence
from ember.sampling_params import SamplingParams
from ember.serve_ray.routing import PrefixRouter, ReplicaReport, RouteRequest, block_key, prompt_keys

BS = 4


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def router(**kw) -> PrefixRouter:
    return PrefixRouter(rng=random.Random(0), **kw)


def test_keys_are_the_engines_block_hashes_cut_short():
    """What a replica's pool names a block is what the router computes from the prompt."""
    kv = KVCacheManager(16, BS)
    kv.pool.cache_events = []
    ids = list(range(1, 12))  # 2 full blocks and a partial one
    request = Request("r", None, ids, SamplingParams(max_tokens=1), len(ids) + 1)
    request.cache_root = root_hash(b"tenant-a", None)
    seq = Sequence(request, 0, list(ids), None)
    assert kv.admit(seq, kv.lookup(seq), len(ids))
    seq.num_computed_tokens = len(ids)
    kv.commit(seq)
    held = {block_key(h) for h, cached in kv.pool.take_cache_events() if cached}
    assert prompt_keys(ids, BS, b"tenant-a") == [k for k in prompt_keys(ids, BS, b"tenant-a") if k in held]
    assert len(prompt_keys(ids, BS, b"tenant-a")) == 2
    assert not set(prompt_keys(ids, BS, b"tenant-b")) & held  # another tenant's namespace shares nothing


def test_evictions_are_reported():
    kv = KVCacheManager(2, BS)
    kv.pool.cache_events = []
    for i, ids in enumerate(([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15])):
        request = Request(f"r{i}", None, ids, SamplingParams(max_tokens=1), 6)
        request.cache_root = root_hash(None, None)
        seq = Sequence(request, 0, list(ids), None)
        assert kv.admit(seq, [], 5)
        seq.num_computed_tokens = 5
        kv.commit(seq)
        kv.free(seq)
    events = kv.pool.take_cache_events()
    assert [c for _, c in events] == [
        True,
        False,
        True,
        False,
        True,
    ]  # one block of room: each evicts the last
    assert kv.pool.take_cache_events() == []


def test_prefix_goes_where_it_is_cached():
    r = router()
    keys = prompt_keys(list(range(40)), BS, b"t")
    r.report("a", ReplicaReport())
    r.report("b", ReplicaReport(blocks=set(keys[:5])))
    assert all(r.choose(["a", "b"], RouteRequest(keys)) == "b" for _ in range(20))


def test_longest_match_wins_and_a_broken_chain_stops_the_match():
    r = router()
    keys = prompt_keys(list(range(40)), BS, b"t")
    r.report("a", ReplicaReport(blocks={keys[0], keys[2], keys[3], keys[4]}))  # block 1 is gone
    r.report("b", ReplicaReport(blocks=set(keys[:3])))
    assert r.matched("a", keys) == 1 and r.matched("b", keys) == 3
    assert r.choose(["a", "b"], RouteRequest(keys)) == "b"


def test_just_sent_counts_until_a_report_could_name_it():
    clock = Clock()
    r = router(recent_ttl=5.0, clock=clock)
    keys = prompt_keys(list(range(40)), BS, b"t")
    first = r.choose(["a", "b"], RouteRequest(keys))
    r.sent(first, RouteRequest(keys))
    r.finished(first)
    assert r.choose(["a", "b"], RouteRequest(keys)) == first  # before any report
    clock.now = 6.0
    assert r.matched(first, keys) == 0  # no report named them: evicted, or never there


def test_nothing_cached_takes_the_less_loaded_of_two():
    r = router()
    r.report("a", ReplicaReport(num_running=3))
    r.report("b", ReplicaReport(num_waiting=1))
    keys = prompt_keys(list(range(40)), BS, b"t")
    assert all(r.choose(["a", "b"], RouteRequest(keys)) == "b" for _ in range(20))
    assert r.choose(["a", "b"], None) == "b"


def test_overload_beats_the_cache():
    r = router(balance_abs=4, balance_rel=1.5)
    keys = prompt_keys(list(range(40)), BS, b"t")
    r.report("a", ReplicaReport(blocks=set(keys), num_running=10))
    r.report("b", ReplicaReport(num_running=1))
    assert r.choose(["a", "b"], RouteRequest(keys)) == "b"
    r.report("a", ReplicaReport(blocks=set(keys), num_running=4))  # busier, not overloaded
    assert r.choose(["a", "b"], RouteRequest(keys)) == "a"
    r.report("a", ReplicaReport(blocks=set(keys), kv_usage=0.99))  # its KV is full
    assert r.choose(["a", "b"], RouteRequest(keys)) == "b"


def test_resident_adapter_goes_to_its_replica_unless_overloaded():
    r = router(balance_abs=4)
    keys = prompt_keys(list(range(40)), BS, b"t", "uid-x")
    r.report("a", ReplicaReport(adapters={"x"}, num_running=3))
    r.report("b", ReplicaReport(blocks=set(keys[:2])))
    assert r.choose(["a", "b"], RouteRequest(keys, adapter="x")) == "a"
    r.report("a", ReplicaReport(adapters={"x"}, num_running=20))
    assert r.choose(["a", "b"], RouteRequest(keys, adapter="x")) == "b"


def test_a_forgotten_replica_holds_nothing():
    r = router()
    keys = prompt_keys(list(range(40)), BS, b"t")
    r.report("a", ReplicaReport(blocks=set(keys)))
    r.forget("a")
    assert r.matched("a", keys) == 0 and r.load("a") == 0
