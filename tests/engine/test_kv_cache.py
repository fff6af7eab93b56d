"""The block pool: allocation by need, sharing after a fork, copy-on-write, nothing leaked."""

from __future__ import annotations

from types import SimpleNamespace

from ember.engine.kv_cache import KVCacheManager


def _seq(computed: int = 0):
    return SimpleNamespace(
        num_computed_tokens=computed, block_table=[], block_hashes=[], num_registered_blocks=0
    )


def test_allocates_blocks_by_need_and_frees_them():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    s = _seq()
    assert kv.allocate_slots(s, 9)  # 3 blocks
    assert len(s.block_table) == 3 and kv.pool.num_free == 5
    s.num_computed_tokens = 9
    assert kv.allocate_slots(s, 3)  # positions 9..11 fit in block 3
    assert len(s.block_table) == 3
    s.num_computed_tokens = 12
    assert kv.allocate_slots(s, 1)
    assert len(s.block_table) == 4
    kv.free(s)
    assert kv.pool.is_whole()


def test_refuses_without_taking_anything_when_full():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    s = _seq()
    assert not kv.allocate_slots(s, 9)
    assert s.block_table == [] and kv.pool.num_free == 2


def test_fork_shares_blocks_and_copies_on_first_write():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = _seq()
    assert kv.allocate_slots(parent, 6)  # one full block, one partial
    parent.num_computed_tokens = 6
    child = _seq(6)
    kv.fork(parent, child)
    assert child.block_table == parent.block_table
    assert kv.pool.num_free == 6  # shared, not copied
    full, partial = parent.block_table
    assert kv.allocate_slots(child, 1)  # writes into the shared partial block: copy it
    assert child.block_table[0] == full and child.block_table[1] != partial
    assert kv.take_copies() == [(partial, child.block_table[1])]
    assert kv.allocate_slots(parent, 1)  # now the only owner: writes in place
    assert parent.block_table == [full, partial] and kv.take_copies() == []
    kv.free(parent)
    kv.free(child)
    assert kv.pool.is_whole()


def test_fork_on_block_boundary_needs_no_copy():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = _seq()
    kv.allocate_slots(parent, 8)
    parent.num_computed_tokens = 8
    child = _seq(8)
    kv.fork(parent, child)
    assert kv.allocate_slots(child, 1)
    assert kv.take_copies() == [] and child.block_table[:2] == parent.block_table
    kv.free(parent)
    kv.free(child)
    assert kv.pool.is_whole()
