"""Continuous batching with one token budget per step, in priority order.

Each step hands out at most `max_num_batched_tokens` tokens of work: running sequences first (a decode
costs one token; a prompt still being prefilled takes a chunk of what is left), then waiting sequences,
up to `max_num_seqs` running, and last the slots speculative decoding asked for its guesses, from
whatever budget and blocks are left. A waiting sequence first takes over the longest cached prefix of its
tokens (see kv_cache), and only what follows it draws on the budget.

Priorities (SamplingParams.priority, lower first; 0 interactive, batches 10): the waiting queue and the
running list are kept in (priority, arrival) order, so urgent work takes the budget first and batch work
fills what it leaves; with one priority this is first come, first served. While priority-0 work is in
the engine, lower-priority work's share of a step is bounded (`_background_budget`): by
`background_slowdown`, the fraction of the interactive work's own step time it may add, by the running
estimate of what a token costs (StepCost, fed by the core with every step's time); and by
`background_token_budget` tokens, when set. Interactive work counts as in the engine for
`background_grace_s` after the last of it left, so a batch does not fill the gap between a user's turns
with a long step the next turn then waits behind. When
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

import math
import time
from collections import deque
from collections.abc import Callable
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


class StepCost:
    """What a step costs, as `fixed + per_token * tokens` seconds: a least-squares line through recent steps
    (exponentially weighted, so it follows the machine's load). Until steps of different sizes have been
    seen, a token is charged the whole average step time per token, which over-charges: background work
    then gets less, never more."""

    def __init__(self, decay: float = 0.98):
        self.decay = decay
        self.n = self.x = self.y = self.xx = self.xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.n = self.n * d + 1.0
        self.x = self.x * d + tokens
        self.y = self.y * d + seconds
        self.xx = self.xx * d + tokens * tokens
        self.xy = self.xy * d + tokens * seconds

    @property
    def known(self) -> bool:
        return self.x > 0

    def _line(self) -> tuple[float, float]:
        ceiling = self.y / self.x  # seconds per token with the fixed cost folded in: an upper bound
        var = self.n * self.xx - self.x * self.x
        if var <= 1e-9 * self.n * self.xx:
            return 0.0, ceiling
        slope = min(max((self.n * self.xy - self.x * self.y) / var, ceiling * 1e-3), ceiling)
        return max((self.y - slope * self.x) / self.n, 0.0), slope

    @property
    def per_token(self) -> float:
        return self._line()[1]

    def seconds(self, tokens: int) -> float:
        fixed, slope = self._line()
        return fixed + slope * tokens


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        lora: LoRAManager | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.kv = kv
        self.lora = lora  # None: the engine serves no adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.cost = StepCost()  # fed by the core (`observe`)
        self.clock = clock
        self._urgent_at = -math.inf  # when interactive work was last in the engine
        self._credit = 0.0  # seconds of step time background work has earned and not spent

    def observe(self, tokens: int, seconds: float) -> None:
        """One executed step: its scheduled tokens and how long it took (for the background share)."""
        self.cost.observe(tokens, seconds)

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
        background = granted = self._background_budget()
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
        if background is not None and self.config.background_slowdown is not None and self.cost.known:
            self._credit = max(self._credit - (granted - background) * self.cost.per_token, 0.0)
        # Speculative slots last, from what the budget and the pool have left once every running
        # sequence and every admission has its tokens: nobody waits or is preempted for a guess (nor, while
        # it is capped, for batch work).
        for seq in self.running:
            n = out.num_scheduled.get(seq)
            if not seq.num_lookahead or n is None or budget <= 0:
                continue
            if background is not None and seq.params.priority > 0:
                continue
            extra = min(seq.num_lookahead, budget)
            if n == 1 == seq.num_tokens - seq.num_computed_tokens and self.kv.allocate_slots(seq, 1 + extra):
                out.num_scheduled[seq] = 1 + extra
                budget -= extra
        return out

    def _background_budget(self) -> int | None:
        """The most tokens lower-priority work may take this step; None: no limit (no interactive work in
        the engine, nor in the last background_grace_s)."""
        cfg = self.config
        if cfg.background_token_budget is None and cfg.background_slowdown is None:
            return None
        now = self.clock()
        urgent = [s for s in self.running if s.params.priority == 0]
        if urgent or any(s.params.priority == 0 for s in self.waiting):
            self._urgent_at = now
        elif now - self._urgent_at >= cfg.background_grace_s:
            self._credit = 0.0
            return None
        caps = [] if cfg.background_token_budget is None else [cfg.background_token_budget]
        if cfg.background_slowdown is not None:
            if not self.cost.known:
                caps.append(1)  # no step timed yet: a token a step until there is a measure
            else:
                # The interactive work's own step: the tokens its running and waiting sequences would take.
                waiting = (s for s in self.waiting if s.params.priority == 0)
                pending = sum(s.num_tokens - s.num_computed_tokens for s in (*urgent, *waiting))
                mine = min(pending, cfg.max_num_batched_tokens)
                allowance = cfg.background_slowdown * self.cost.seconds(mine)
                per_token = self.cost.per_token
                # What is not spent carries over (a token every few steps where one costs more than a step's
                # allowance), but never more than a step's worth and one token: no bursts after a pause.
                self._credit = min(self._credit + allowance, allowance + per_token)
                caps.append(int(self._credit / per_token + 1e-9))
        return min(caps)

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
