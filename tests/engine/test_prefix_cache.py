"""Prefix caching: block hashes, reuse, namespaces, LRU eviction, and outputs that do not change."""

from __future__ import annotations

import random

import pytest

from ember import LLM, SamplingParams
from ember.engine.kv_cache import KVCacheManager, chain_hash, root_hash
from ember.engine.sequence import Request, Sequence
from tests.helpers import make_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _seq(tokens: list[int], salt: bytes | None = None, cap: int | None = None) -> Sequence:
    request = Request("r", None, list(tokens), SamplingParams(), len(tokens) + 8)
    request.cache_root = root_hash(salt)
    request.max_cached_tokens = cap
    seq = Sequence(request, 0, list(tokens), None)
    request.seqs.append(seq)
    return seq


def _run_prefill(kv: KVCacheManager, seq: Sequence) -> None:
    """What the scheduler and the engine do for a whole prompt: look up, admit, compute, commit."""
    hits = kv.lookup(seq)
    assert kv.admit(seq, hits, seq.num_tokens - len(hits) * kv.block_size)
    seq.num_computed_tokens = seq.num_tokens
    kv.commit(seq)


def test_hash_chain_depends_on_every_earlier_token_and_the_root():
    a = root_hash(b"tenant-a")
    assert a == root_hash(b"tenant-a") and a != root_hash(b"tenant-b") and a != root_hash(None)
    assert root_hash(None, "adapter-1") != root_hash(None)
    h1 = chain_hash(a, [1, 2, 3, 4])
    assert h1 == chain_hash(a, [1, 2, 3, 4])
    assert h1 != chain_hash(a, [1, 2, 3, 5]) and h1 != chain_hash(root_hash(b"tenant-b"), [1, 2, 3, 4])
    # Token ids are packed as 32-bit integers: [1, 256] must not collide with any other split.
    assert chain_hash(a, [1, 256]) != chain_hash(a, [256, 1])
    assert chain_hash(h1, [5, 6, 7, 8]) != chain_hash(chain_hash(a, [9, 2, 3, 4]), [5, 6, 7, 8])


def test_second_sequence_reuses_the_whole_blocks_of_the_shared_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = _seq(list(range(100, 111)))  # 11 tokens: 2 full blocks, a partial one
    _run_prefill(kv, first)
    assert kv.pool.num_cached == 2
    table = list(first.block_table)
    kv.free(first)
    # Shares 10 tokens (ends mid-block): the 2 full blocks are reused, the rest computed.
    second = _seq(list(range(100, 110)) + [7, 8, 9])
    hits = kv.lookup(second)
    assert hits == table[:2]
    assert kv.admit(second, hits, second.num_tokens - 8)
    assert second.num_computed_tokens == 8 and second.block_table[:2] == hits
    assert (kv.prefix_queries, kv.prefix_hits) == (11 + 13, 8)
    kv.free(second)
    assert kv.pool.is_whole()


def test_the_last_token_is_always_computed_and_the_cap_is_honoured():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    _run_prefill(kv, _seq(list(range(8))))
    again = _seq(list(range(8)))  # the same 8 tokens: only the first block may come from the cache
    assert len(kv.lookup(again)) == 1
    longer = _seq(list(range(8)) + [99])
    assert len(kv.lookup(longer)) == 2
    assert len(kv.lookup(_seq(list(range(8)) + [99], cap=5))) == 1
    assert kv.lookup(_seq(list(range(8)) + [99], cap=0)) == []


def test_the_cap_holds_after_a_preemption():
    """A sequence readmitted after a preemption has hashes for every block it computed; the cap still
    bounds what it takes."""
    kv = KVCacheManager(num_blocks=16, block_size=4)
    seq = _seq(list(range(40)), cap=8)
    _run_prefill(kv, seq)
    assert len(seq.block_hashes) == 10
    kv.free(seq)
    seq.num_computed_tokens = 0
    assert len(kv.lookup(seq)) == 2
    assert kv.admit(seq, kv.lookup(seq), 32) and seq.num_computed_tokens == 8
    assert seq.request.num_cached_tokens == 0  # reported at the first admission only


def test_namespaces_do_not_share():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    _run_prefill(kv, _seq(list(range(9)), salt=b"a"))
    assert kv.lookup(_seq(list(range(9)), salt=b"b")) == []
    assert kv.lookup(_seq(list(range(9)), salt=None)) == []
    assert len(kv.lookup(_seq(list(range(9)), salt=b"a"))) == 2


def test_disabled_cache_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    s = _seq(list(range(9)))
    _run_prefill(kv, s)
    kv.free(s)
    assert kv.pool.num_cached == 0 and kv.lookup(_seq(list(range(9)))) == []


def test_eviction_is_lru_prefers_uncached_blocks_and_spares_running_ones():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    old, new = _seq([1] * 8 + [0]), _seq([2] * 8 + [0])
    _run_prefill(kv, old)
    _run_prefill(kv, new)
    kv.free(old)
    kv.free(new)
    assert kv.pool.num_cached == 4 and kv.pool.num_free == 6
    # The two plain free blocks go first, then the least recently freed cached one: old's tail block,
    # so old's head stays cached, and all of new's blocks do.
    filler = _seq([3] * 12)
    assert kv.admit(filler, [], 12)
    assert kv.pool.num_evictions == 1
    assert len(kv.lookup(_seq([1] * 8 + [0]))) == 1 and len(kv.lookup(_seq([2] * 8 + [0]))) == 2
    # new's blocks are in use by a running sequence now: they cannot be evicted for anyone.
    holder = _seq([2] * 8 + [5])
    hits = kv.lookup(holder)
    assert kv.admit(holder, hits, 1)
    assert not kv.admit(_seq([4] * 8), [], 8)
    assert len(kv.lookup(_seq([2] * 8 + [0]))) == 2
    for s in (filler, holder):
        kv.free(s)
    assert kv.pool.is_whole()


def test_greedy_output_same_with_a_hit_as_without(default_model_dir, default_llm):
    """The default model; shared parts that end mid-block and on a block boundary."""
    tok = default_llm.tokenizer
    base = make_prompts(tok, [120], seed=11)[0]
    other = tok.encode(" zebra")[0]
    assert base[48] != other
    cold = LLM(model=str(default_model_dir), kv_cache_memory="64MiB", enable_prefix_caching=False)
    engine = default_llm.engine
    engine.kv.reset_prefix_cache()
    # Leaves base's blocks in the cache, and those of the tokens it generated (all but the last).
    generated = default_llm.generate(base, GREEDY)[0].outputs[0].token_ids
    assert generated == cold.generate(base, GREEDY)[0].outputs[0].token_ids
    prompts = [
        base[:37] + make_prompts(tok, [20], seed=12)[0],  # shared part ends mid-block
        base[:48] + [other] * 5,  # ends on a block boundary
        base[:48] + [other],  # one token left to compute after the hit
        base,  # the whole prompt again: its last token is computed
        base + generated + [other] * 3,  # a follow-up turn: reuses blocks filled while decoding
    ]
    want = [r.outputs[0].token_ids for r in cold.generate(prompts, GREEDY)]
    got = default_llm.generate(prompts, GREEDY)
    last = len(base) + len(generated) - 1  # tokens of the first run whose KV was computed
    cached = [32, 48, 48, (len(base) - 1) // 16 * 16, last // 16 * 16]
    assert [r.num_cached_tokens for r in got] == cached
    assert [r.outputs[0].token_ids for r in got] == want
    assert engine.kv.pool.is_whole()


def test_a_thousand_token_prefix_is_reused_in_whole_blocks(default_llm):
    tok = default_llm.tokenizer
    prefix = sum(make_prompts(tok, [600, 600], seed=21), [])[:1000]
    assert len(prefix) == 1000
    a = prefix + tok.encode(" What is the first word?")
    b = prefix + tok.encode(" Count the boats.")
    default_llm.engine.kv.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=4)
    assert default_llm.generate(a, params)[0].num_cached_tokens == 0
    assert default_llm.generate(b, params)[0].num_cached_tokens == 1000 // 16 * 16


def test_eviction_under_pressure_keeps_outputs_and_the_pool_whole(random_model_dirs, random_llm):
    """A pool of 24 blocks, 12 distinct 2-block prefixes each asked three times, interleaved."""
    rng = random.Random(5)
    prefixes = [[rng.randrange(100, 5000) for _ in range(32)] for _ in range(12)]
    prompts = [p + [rng.randrange(100, 5000) for _ in range(rng.randrange(1, 20))] for p in prefixes * 3]
    rng.shuffle(prompts)
    path = str(random_model_dirs["llama-gqa"])
    plain = LLM(model=path, num_blocks=64, enable_prefix_caching=False)
    want = [r.outputs[0].token_ids for r in plain.generate(prompts, GREEDY)]
    tight = LLM(model=path, num_blocks=24, max_num_seqs=4)
    got = []
    for i in range(0, len(prompts), 6):  # waves, so later waves find (and evict) earlier prefixes
        got += [r.outputs[0].token_ids for r in tight.generate(prompts[i : i + 6], GREEDY)]
    assert got == want
    pool = tight.engine.kv.pool
    assert pool.num_evictions > 0 and tight.engine.kv.prefix_hits > 0
    assert pool.is_whole()


@pytest.mark.parametrize("n", [1, 3])
def test_preemption_and_samples_with_cached_prefixes(random_model_dirs, random_llm, n):
    """Preempted sequences come back through the cache; n > 1 samples fork from cached blocks."""
    tok = random_llm.tokenizer
    prompts = make_prompts(tok, [60, 61, 62, 63], seed=41)
    params = SamplingParams(temperature=0.7, seed=3, n=n, max_tokens=40, ignore_eos=True)
    path = str(random_model_dirs["llama-gqa"])
    plain = LLM(model=path, num_blocks=256, enable_prefix_caching=False)
    want = [[c.token_ids for c in r.outputs] for r in plain.generate(prompts, params)]
    tight = LLM(model=path, num_blocks=12 * n)
    tight.generate(prompts[0], SamplingParams(max_tokens=1))
    kv = tight.engine.kv
    hits_before = kv.prefix_hits
    outs = tight.generate(prompts, params)
    assert [[c.token_ids for c in r.outputs] for r in outs] == want
    assert tight.engine.scheduler.num_preemptions > 0
    # Reported once per request, at its first admission: prompt 0 finds its warm-up's blocks.
    assert outs[0].num_cached_tokens == (len(prompts[0]) - 1) // 16 * 16
    assert kv.prefix_hits - hits_before == sum(r.num_cached_tokens for r in outs)
    assert kv.prefix_queries == len(prompts[0]) + sum(map(len, prompts))
    assert kv.pool.is_whole()


def test_the_token_budget_counts_only_what_is_computed(random_model_dirs):
    """With 16 tokens of budget per step, a 58-token prompt whose first 48 are cached prefills in one
    step; without the cache it takes four."""
    rng = random.Random(9)
    prefix = [rng.randrange(100, 5000) for _ in range(48)]
    llm = LLM(model=str(random_model_dirs["llama-gqa"]), num_blocks=32, max_num_batched_tokens=16)
    llm.generate(prefix + [7, 7], SamplingParams(max_tokens=1))
    engine = llm.engine
    for salt, steps in ((None, 1), (b"someone else", 4)):
        request = engine.add_request(prefix + [9] * 10, SamplingParams(max_tokens=1), cache_salt=salt)
        taken = 0
        while engine.has_unfinished_requests():
            engine.step()
            taken += 1
        assert taken == steps and request.num_cached_tokens == (48 if salt is None else 0)
    assert engine.kv.pool.is_whole()
