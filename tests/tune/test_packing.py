"""Packing: positions restart per sequence, the trained rows are the ones before supervised tokens."""

from __future__ import annotations

from ember.tune.packing import pack, split_by_tokens


def test_pack_rows_targets_and_positions():
    p = pack([([5, 6, 7], [False, True, True]), ([8, 9], [True, True])])
    assert p.positions.tolist() == [0, 1, 2, 0, 1]
    assert p.rows.tolist() == [0, 1, 3]  # a sequence's first token has no row predicting it
    assert p.targets.tolist() == [6, 7, 9]
    assert p.sequence_of_row.tolist() == [0, 0, 1]
    assert p.meta.seq_lens == [3, 2]


def test_split_by_tokens_keeps_groups_whole():
    a, b, c = ([1] * 3, [True] * 3), ([1] * 4, [True] * 4), ([1] * 9, [True] * 9)
    assert split_by_tokens([[a], [b], [c]], 8) == [[a, b], [c]]
    assert split_by_tokens([[a, b], [c]], 5) == [[a, b], [c]]
