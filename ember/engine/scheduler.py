"""Continuous batching with one token budget per step.

Each step hands out at most `max_num_batched_tokens` tokens of work: running sequences first (a decode
costs one token; a prompt still being prefilled takes a chunk of what is left), then waiting sequences in
arrival order, up to `max_num_seqs` running, and last the slots speculative decoding asked for its
guesses, from whatever budget and blocks are left. A waiting sequence first takes over the longest cached
prefix of its tokens (see kv_cache), and only what follows it draws on the budget. When the KV pool
cannot hold a running sequence's next tokens, the newest running sequence is preempted: its blocks go
back to the pool and it returns to the front of the queue, to be recomputed (prompt plus what it
generated so far, from the cache where its blocks are still there) when room frees up.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ember.config import SchedulerConfig
from ember.engine.kv_cache import KVCacheManager
from ember.engine.sequence import Sequence, Status
from ember.lora.manager import LoRAManager


@dataclass
class SchedulerOutput:
    # Tokens of work per sequence this step, in running order.
    num_scheduled: dict[Sequence, int] = field(default_factory=dict)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.num_scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, lora: LoRAManager | None = None):
        self.config = config
        self.kv = kv
        self.lora = lora  # None: the engine serves no adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._allocate_or_preempt(seq, n, out):
                break
            out.num_scheduled[seq] = n
            budget -= n
            i += 1
        # Admit new work only when nothing had to be preempted this step: FCFS, no skipping ahead,
        # except past a sequence whose grammar is still compiling or whose LoRA adapter cannot get a
        # slot (every slot busy with others): it keeps its place, and the requests behind it go on.
        blocked: list[Sequence] = []
        while not out.preempted and self.waiting and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            if seq.request.grammar_pending or not self._acquire_lora(seq):
                blocked.append(self.waiting.popleft())
                continue
            # A cached prefix costs no budget: only the tokens after it are computed.
            hits = self.kv.lookup(seq)
            cached = len(hits) * self.kv.block_size
            n = min(seq.num_tokens - cached, budget)
            if not self.kv.admit(seq, hits, n):
                self._release_lora(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.num_scheduled[seq] = n
            budget -= n
        self.waiting.extendleft(reversed(blocked))
        # Speculative slots last, from what the budget and the pool have left once every running
        # sequence and every admission has its tokens: nobody waits or is preempted for a guess.
        for seq in self.running:
            n = out.num_scheduled.get(seq)
            if not seq.num_lookahead or n is None or budget <= 0:
                continue
            extra = min(seq.num_lookahead, budget)
            if n == 1 == seq.num_tokens - seq.num_computed_tokens and self.kv.allocate_slots(seq, 1 + extra):
                out.num_scheduled[seq] = 1 + extra
                budget -= extra
        return out

    def _allocate_or_preempt(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Room for `n` more tokens of a running sequence, preempting the newest running ones until it
        fits; False when `seq` itself had to go."""
        while not self.kv.allocate_slots(seq, n):
            victim = self.running.pop()  # the newest; sequences before this one are already scheduled
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _acquire_lora(self, seq: Sequence) -> bool:
        name = seq.request.lora
        if name is None or self.lora is None or seq.lora_slot is not None:
            return True
        seq.lora_slot = self.lora.acquire(name)
        return seq.lora_slot is not None

    def _release_lora(self, seq: Sequence) -> None:
        if seq.lora_slot is not None and self.lora is not None:
            self.lora.release(seq.request.lora)
            seq.lora_slot = None

    def _preempt(self, seq: Sequence) -> None:
        self._release_lora(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.num_draft_computed = 0
        seq.num_lookahead = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def insert_after(self, anchor: Sequence, seqs: list[Sequence]) -> None:
        """Place freshly forked samples right after their parent in the running list."""
        at = self.running.index(anchor) + 1
        for s in seqs:
            s.status = Status.RUNNING
            self._acquire_lora(s)  # the parent's adapter is resident: this cannot fail
        self.running[at:at] = seqs

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence wherever it is and return its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self._release_lora(seq)
        self.kv.free(seq)
