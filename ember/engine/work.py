"""A sequence's share of one forward pass, and the order the model runner takes them in."""

from __future__ import annotations

from typing import NamedTuple


class Work(NamedTuple):
    token_ids: list[int]  # the sequence's tokens, with proposed ones appended when they are verified
    start: int  # tokens whose KV is cached: the first position computed now
    num_new: int  # positions computed this step
    block_table: list[int]


def decodes_first(work: list[Work]) -> list[int]:
    """Indices of `work` in the runner's order: one-token rows (decodes) first, then prefill chunks and
    verifications, each group in its given order. The attention metadata takes the leading one-token
    rows as the decode batch; every caller of the runner orders its work here."""
    return sorted(range(len(work)), key=lambda i: work[i].num_new != 1)
