"""The KV block pool: fixed-size blocks, per-sequence block tables, reference counts for shared blocks.

A sequence holding `t` tokens of KV owns ceil(t / block_size) blocks, listed in its block table. The n
samples of one request share the prompt's blocks after the fork (reference counts); the first write into
a shared, partly filled block copies it first (copy-on-write), and the copy is queued for the model
runner to perform before the step's forward pass.
"""

from __future__ import annotations

from collections import deque

from ember.engine.sequence import Sequence


class OutOfBlocks(Exception):
    """Raised inside allocation when the pool cannot hold what was asked; the caller preempts or waits."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_whole(self) -> bool:
        """Every block free and unreferenced: nothing leaked after a workload."""
        return len(self._free) == self.num_blocks and not any(self.ref_counts)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks
        block = self._free.popleft()
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies for the next step

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for the KV of `num_new_tokens` more tokens of `seq`; False (nothing taken) if full."""
        start = seq.num_computed_tokens
        need = self.blocks_for(start + num_new_tokens) - len(seq.block_table)
        first = start // self.block_size
        cow = first < len(seq.block_table) and self.pool.ref_counts[seq.block_table[first]] > 1
        if need + cow > self.pool.num_free:
            return False
        if cow:
            # This sample is about to write into a block its siblings still read: give it its own copy.
            shared = seq.block_table[first]
            own = self.pool.allocate()
            self.pending_copies.append((shared, own))
            self.pool.decref(shared)
            seq.block_table[first] = own
        seq.block_table.extend(self.pool.allocate() for _ in range(need))
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        for block in parent.block_table:
            self.pool.incref(block)
        child.block_table = list(parent.block_table)

    def free(self, seq: Sequence) -> None:
        # Newest blocks first, so a later allocation reuses them last.
        for block in reversed(seq.block_table):
            self.pool.decref(block)
        seq.block_table = []

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
