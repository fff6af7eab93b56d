"""The KV block pool: fixed-size blocks, per-sequence block tables, reference counts, and the prefix cache.

A sequence holding `t` tokens of KV owns ceil(t / block_size) blocks, listed in its block table. The n
samples of one request share the prompt's blocks after the fork (reference counts); the first write into
a shared, partly filled block copies it first (copy-on-write), and the copy is queued for the model
runner to perform before the step's forward pass.

Prefix caching: once a block is full and its KV computed, it is named by a hash chained from the
previous block's hash and the block's token ids; the chain starts from a root that takes the cache
namespace (the tenant) and the adapter, so KV is only ever shared where it would be bit-identical and
between requests allowed to see each other's prompts. A finished sequence's blocks stay in the pool under
their hashes; a new request takes over the longest run of cached blocks that starts its prompt and
computes only the rest. Free blocks with no hash are handed out first; when none is left, the
least-recently freed cached block is evicted. Blocks a running sequence holds are never evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from ember.engine.sequence import Sequence


class OutOfBlocks(Exception):
    """Raised inside allocation when the pool cannot hold what was asked; the caller preempts or waits."""


def root_hash(namespace: bytes | None = None, adapter: str | None = None) -> bytes:
    """Where a sequence's hash chain starts: the same only for the same namespace and adapter."""
    h = hashlib.blake2b(b"ember-kv-prefix/1", digest_size=16)
    for part in (namespace or b"", (adapter or "").encode()):
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    return h.digest()


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The hash of a full block, from its parent's hash and its token ids. A cryptographic hash: nobody
    can craft a prompt whose blocks collide with someone else's."""
    return hashlib.blake2b(parent + array("i", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))  # free, holding nothing worth keeping
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # free, still cached; oldest first
        self.num_evictions = 0
        # (hash, True: now cached | False: evicted) since the core's last report; None: not recorded. A
        # replica behind a router reports them, so the router knows which prompt prefixes it holds.
        self.cache_events: list[tuple[bytes, bool]] | None = None

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._free_cached)

    @property
    def num_cached(self) -> int:
        return len(self.by_hash)

    def is_whole(self) -> bool:
        """Every block free and unreferenced: nothing leaked after a workload (cached blocks are free)."""
        return self.num_free == self.num_blocks and not any(self.ref_counts)

    def allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._free_cached:
            block, _ = self._free_cached.popitem(last=False)
            self._evict(block)
        else:
            raise OutOfBlocks
        self.ref_counts[block] = 1
        return block

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            del self.by_hash[h]
            self.block_hash[block] = None
            self.num_evictions += 1
            if self.cache_events is not None:
                self.cache_events.append((h, False))

    def incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:  # a cached block coming back into use
            del self._free_cached[block]
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if self.block_hash[block] is None:
                self._free.append(block)
            else:
                self._free_cached[block] = None

    def register(self, block: int, h: bytes) -> None:
        """Name a full, computed block by its hash; a hash another block already holds stays with it."""
        if h not in self.by_hash and self.block_hash[block] is None:
            self.by_hash[h] = block
            self.block_hash[block] = h
            if self.cache_events is not None:
                self.cache_events.append((h, True))

    def take_cache_events(self) -> list[tuple[bytes, bool]]:
        if not self.cache_events:
            return []
        events, self.cache_events = self.cache_events, []
        return events

    def reset_cache(self) -> None:
        """Forget every cached block (the KV stays valid for the sequences holding it)."""
        for block in list(self._free_cached):
            self._free.append(block)
        self._free_cached.clear()
        if self.cache_events is not None:
            self.cache_events.extend((h, False) for h in self.by_hash)
        self.by_hash.clear()
        self.block_hash = [None] * self.num_blocks


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies for the next step
        # Counted in tokens, cumulative: what admissions looked up and what they found.
        self.prefix_queries = 0
        self.prefix_hits = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- the prefix cache ---------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chain hashes of the sequence's first `num_blocks` full blocks (computed once, kept)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else seq.request.cache_root
            hashes.append(chain_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes[:num_blocks]

    def lookup(self, seq: Sequence) -> list[int]:
        """The longest run of cached blocks that starts this sequence's tokens; nothing is taken.

        At least the last token is always left to compute: its logits are what the step samples from. A
        request's cap (`max_cached_tokens`) bounds the tokens taken, generated ones included after a
        preemption."""
        if not self.enable_prefix_caching or seq.request.cache_root is None:
            return []
        limit = seq.num_tokens - 1
        if seq.request.max_cached_tokens is not None:
            limit = min(limit, seq.request.max_cached_tokens)
        hits = []
        for h in self._hashes(seq, limit // self.block_size):
            block = self.pool.by_hash.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def commit(self, seq: Sequence) -> None:
        """After a step: name the sequence's blocks that are now full and computed."""
        full = seq.num_computed_tokens // self.block_size
        if (
            full <= seq.num_registered_blocks
            or seq.request.cache_root is None
            or not self.enable_prefix_caching
        ):
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_registered_blocks, full):
            self.pool.register(seq.block_table[i], hashes[i])
        seq.num_registered_blocks = full

    def reset_prefix_cache(self) -> None:
        """Forget every cached block; for an idle engine (running sequences would not re-name theirs)."""
        self.pool.reset_cache()

    # -- allocation ---------------------------------------------------------------------------------

    def admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Give a waiting sequence the cached blocks `hits` (from lookup) and room for `num_new_tokens`
        tokens after them; False (nothing taken) if the pool cannot hold it."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        cached = len(hits) * self.block_size
        reviving = sum(1 for b in hits if self.pool.ref_counts[b] == 0)  # they leave the free list
        need = self.blocks_for(cached + num_new_tokens) - len(hits)
        if need + reviving > self.pool.num_free:
            return False
        for block in hits:
            self.pool.incref(block)
        seq.block_table = list(hits)
        seq.num_computed_tokens = cached
        seq.num_registered_blocks = len(hits)
        seq.block_table.extend(self.pool.allocate() for _ in range(need))
        request = seq.request
        if not request.admitted:
            # Reported once per request, for its prompt: a sequence readmitted after a preemption finds
            # its own blocks again, which is no saving on the prompt the client sent.
            request.admitted = True
            request.num_cached_tokens = cached
            if self.enable_prefix_caching and request.cache_root is not None:
                self.prefix_queries += seq.num_prompt_tokens
                self.prefix_hits += cached
        return True

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

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past what the sequence's tokens need: slots reserved for speculative
        tokens that were rejected (never named in the prefix cache, as nothing in them was kept)."""
        keep = self.blocks_for(seq.num_tokens)
        while len(seq.block_table) > keep:
            self.pool.decref(seq.block_table.pop())

    def fork(self, parent: Sequence, child: Sequence) -> None:
        for block in parent.block_table:
            self.pool.incref(block)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_registered_blocks = parent.num_registered_blocks

    def free(self, seq: Sequence) -> None:
        # Last block first: among the cached ones, the tail is evicted before the head, and the head is
        # what other prompts share.
        for block in reversed(seq.block_table):
            self.pool.decref(block)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
