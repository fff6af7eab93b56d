"""A sequence's share of one forward pass, and the order the model runner takes them in.

Work is plain data the size of what is computed (not of the sequence's history), so a runner in another
process can be handed it as it is."""

from __future__ import annotations

from typing import NamedTuple


class Work(NamedTuple):
    token_ids: list[int]  # the tokens computed this step, at positions start .. start + num_new - 1
    start: int  # tokens whose KV is cached: the first position computed now
    num_new: int  # len(token_ids)
    block_table: list[int]

    @classmethod
    def of(cls, token_ids: list[int], start: int, num_new: int, block_table: list[int]) -> Work:
        """The share of a sequence whose tokens are `token_ids`: positions start .. start + num_new - 1."""
        return cls(token_ids[start : start + num_new], start, num_new, block_table)


def decodes_first(work: list[Work]) -> list[int]:
    """Indices of `work` in the runner's order: one-token rows (decodes) first, then prefill chunks and
    verifications, each group in its given order. The attention metadata takes the leading one-token
    rows as the decode batch; every caller of the runner orders its work here."""
    return sorted(range(len(work)), key=lambda i: work[i].num_new != 1)
