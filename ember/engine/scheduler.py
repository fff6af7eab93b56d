"""Continuous batching with one token budget per step, in priority order.

Each step hands out at most `max_num_batched_tokens` tokens of work: running sequences first (a decode
costs one token; a prompt still being prefilled takes a chunk of what is left), then waiting sequences,
up to `max_num_seqs` running, and last the slots speculative decoding asked for its guesses, from
whatever budget and blocks are left. A waiting sequence first takes over the longest cached prefix of its
tokens (see kv_cache), and only what follows it draws on the budget.

Priorities (SamplingParams.priority, lower first; 0 interactive, batches 10): the waiting queue and the
running list are kept in (priority, arrival) order, so urgent work takes the budget first and batch work
fills what it leaves; with one priority this is first come, first served. While priority-0 work is in
the engine, lower-priority work takes at most `background_token_budget` tokens a step (when set). When
the KV pool cannot hold a running sequence's next tokens, the last running sequence (the least urgent,
newest) is preempted; when a waiting sequence cannot be admitted for want of blocks or sequence slots,
running sequences strictly less urgent than it are preempted, least urgent first. A preempted sequence's
blocks go back to the pool (its full blocks stay in the prefix cache until evicted) and it returns to the
front of its priority in the queue, to be recomputed, mostly from the cache, when room frees up. Urgent
work never preempts work as urgent as itself, so interactive requests cannot thrash each other; a batch
sequence may be preempted each time an interactive one needs its room, and resumes as soon as there is
room again.
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
    refund: int = 0  # tokens a preemption during admission gave back (Scheduler._yield_to)

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
        self._enqueue(seq, front=False)

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        """Into the waiting queue behind every more urgent sequence, and behind (or, `front`: ahead of)
        those of its own priority."""
        p = seq.params.priority
        waiting = self.waiting
        if not front and (not waiting or waiting[-1].params.priority <= p):
            waiting.append(seq)  # the common case: one priority
            return
        if front and (not waiting or waiting[0].params.priority >= p):
            waiting.appendleft(seq)
            return
        i = 0
        while i < len(waiting) and (
            waiting[i].params.priority < p if front else waiting[i].params.priority <= p
        ):
            i += 1
        waiting.insert(i, seq)

    def _run(self, seq: Sequence) -> None:
        """Into the running list behind every sequence as urgent as it or more."""
        seq.status = Status.RUNNING
        p = seq.params.priority
        running = self.running
        i = len(running)
        while i > 0 and running[i - 1].params.priority > p:
            i -= 1
        running.insert(i, seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # Lower-priority work's share while interactive work is in the engine (None: no cap).
        background = self._background_budget()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if background is not None and seq.params.priority > 0:
                n = min(n, background)
                if n == 0:
                    break  # the rest of the list is no more urgent
            if not self._allocate_or_preempt(seq, n, out):
                break
            out.num_scheduled[seq] = n
            budget -= n
            if background is not None and seq.params.priority > 0:
                background -= n
            i += 1
        # Admit new work only when no running sequence had to be preempted this step: in queue order, no
        # skipping ahead, except past a sequence whose grammar is still compiling or whose LoRA adapter
        # cannot get a slot (every slot busy with others): it keeps its place, and the requests behind it
        # go on. A sequence with no room may preempt running ones less urgent than itself.
        blocked: list[Sequence] = []
        crowded = bool(out.preempted)
        while not crowded and self.waiting and budget > 0:
            seq = self.waiting[0]
            urgent = seq.params.priority == 0
            if not urgent and background is not None and background <= 0:
                break
            if len(self.running) >= self.config.max_num_seqs:
                if not self._yield_to(seq, out):
                    break
                budget += out.refund
                continue
            if seq.request.grammar_pending or not self._acquire_lora(seq):
                blocked.append(self.waiting.popleft())
                continue
            # A cached prefix costs no budget: only the tokens after it are computed.
            hits = self.kv.lookup(seq)
            cached = len(hits) * self.kv.block_size
            n = min(seq.num_tokens - cached, budget)
            if not urgent and background is not None:
                n = min(n, background)
            if not self.kv.admit(seq, hits, n):
                if self._yield_to(seq, out):
                    budget += out.refund
                    continue
                self._release_lora(seq)
                break
            self.waiting.popleft()
            self._run(seq)
            out.num_scheduled[seq] = n
            budget -= n
            if not urgent and background is not None:
                background -= n
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

    def _background_budget(self) -> int | None:
        cap = self.config.background_token_budget
        if cap is None:
            return None
        urgent = any(s.params.priority == 0 for s in self.running) or any(
            s.params.priority == 0 for s in self.waiting
        )
        return cap if urgent else None

    def _yield_to(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Preempt the least urgent running sequence if it is less urgent than `seq` (which has no room);
        whether one was. Its tokens scheduled this step, if any, are given back in `out.refund`."""
        out.refund = 0
        if not self.running or self.running[-1].params.priority <= seq.params.priority:
            return False
        victim = self.running.pop()
        out.refund = out.num_scheduled.pop(victim, 0)
        self._preempt(victim)
        out.preempted.append(victim)
        return True

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
        self._enqueue(seq, front=True)
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
