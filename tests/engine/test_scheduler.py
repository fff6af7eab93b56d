"""The scheduler: one token budget per step, FCFS admission, a cap on running, preemption of the newest."""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.config import SchedulerConfig
from ember.engine.kv_cache import KVCacheManager
from ember.engine.scheduler import Scheduler
from ember.engine.sequence import Status
from ember.sampling_params import SamplingParams


@dataclass
class FakeRequest:
    cache_root: bytes | None = None  # not in the prefix cache
    max_cached_tokens: int | None = None
    num_cached_tokens: int = 0
    admitted: bool = False
    lora: str | None = None
    grammar_pending: bool = False


@dataclass(eq=False)  # hashable by identity, as the engine's Sequence
class FakeSeq:
    num_tokens: int
    num_computed_tokens: int = 0
    num_lookahead: int = 0
    num_draft_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    lora_slot: int | None = None
    request: FakeRequest = field(default_factory=FakeRequest)
    params: SamplingParams = field(default_factory=SamplingParams)  # its priority (0: interactive)

    @property
    def num_prompt_tokens(self) -> int:
        return self.num_tokens


def _seq(num_tokens: int) -> FakeSeq:
    return FakeSeq(num_tokens)


def _advance(out):
    """What the engine does after a step: KV computed; sequences that caught up get a new token."""
    for seq, n in out.num_scheduled.items():
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.num_tokens += 1


def _scheduler(budget=16, max_seqs=8, blocks=64, block_size=4):
    kv = KVCacheManager(blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), kv), kv


def test_long_prompt_prefills_in_chunks_within_the_budget():
    sched, _ = _scheduler(budget=16)
    s = _seq(40)
    sched.add(s)
    chunks = []
    while s.num_computed_tokens < 40:
        out = sched.schedule()
        assert sum(out.num_scheduled.values()) <= 16
        chunks.append(out.num_scheduled[s])
        _advance(out)
    assert chunks == [16, 16, 8]


def test_decodes_and_prefill_chunks_share_one_budget():
    sched, _ = _scheduler(budget=10)
    a, b = _seq(3), _seq(30)
    sched.add(a)
    _advance(sched.schedule())  # a prefilled
    sched.add(b)
    out = sched.schedule()
    assert out.num_scheduled == {a: 1, b: 9}


def test_fcfs_and_running_cap():
    sched, _ = _scheduler(budget=100, max_seqs=2)
    seqs = [_seq(5) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert list(out.num_scheduled) == seqs[:2]
    assert list(sched.waiting) == [seqs[2]]


def test_preempts_newest_when_blocks_run_out_and_resumes_it_first():
    sched, kv = _scheduler(budget=100, blocks=4, block_size=4)
    a, b = _seq(4), _seq(4)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    while not out.preempted:  # decode until the 4 blocks are spent and a 5th is needed
        _advance(out)
        out = sched.schedule()
    assert a.num_computed_tokens == 8  # a needs its 3rd block; b, the newest, makes room
    assert out.preempted == [b] and list(out.num_scheduled) == [a]
    assert b.num_computed_tokens == 0 and b.block_table == [] and sched.waiting[0] is b
    assert sched.num_preemptions == 1
    sched.finish(a)
    out = sched.schedule()
    assert out.num_scheduled == {b: b.num_tokens}  # recomputes prompt and generated tokens
    sched.finish(b)
    assert kv.pool.is_whole()


def test_a_sequence_preempts_itself_when_it_is_the_newest():
    sched, kv = _scheduler(budget=100, blocks=3, block_size=4)
    a, b = _seq(4), _seq(7)
    sched.add(a)
    sched.add(b)
    _advance(sched.schedule())  # a: 1 block, b: 2 blocks; pool full
    out = sched.schedule()  # a needs a 2nd block: b, the newest, goes
    assert out.preempted == [b] and a in out.num_scheduled
    sched.finish(a)
    sched.finish(b)
    assert kv.pool.is_whole()


def test_speculative_slots_come_last_from_what_is_left():
    """Every running sequence gets its decode token before anyone gets slots for guesses, and guesses
    take only leftover budget and free blocks: nobody is starved or preempted for them."""
    sched, kv = _scheduler(budget=8, blocks=64, block_size=4)
    seqs = [_seq(1) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    _advance(sched.schedule())  # prefilled: each has one token pending
    for s in seqs:
        s.num_lookahead = 3
    out = sched.schedule()
    assert all(out.num_scheduled[s] >= 1 for s in seqs)  # all four decode
    assert sum(out.num_scheduled.values()) == 8  # the 4 tokens left over went to guesses, in order
    assert [out.num_scheduled[s] for s in seqs] == [4, 2, 1, 1]


def test_speculative_slots_never_preempt():
    sched, kv = _scheduler(budget=64, blocks=2, block_size=4)
    a, b = _seq(3), _seq(3)
    sched.add(a)
    sched.add(b)
    _advance(sched.schedule())  # each holds one block, with room for its next token
    a.num_lookahead = b.num_lookahead = 4  # guesses would need a second block each; none is free
    out = sched.schedule()
    assert out.num_scheduled == {a: 1, b: 1} and not out.preempted
    assert kv.pool.num_free == 0
