"""Padding-free packing: whole sequences back to back in one flat batch, split into micro-batches by tokens.

A sequence is (token ids, supervised mask). Token j supervised means row j - 1 of its sequence is trained
to predict it, so a pack records those rows and their targets; positions restart at 0 per sequence and
attention stays within it (ember.models.attention.PackedMetadata).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.models.attention import PackedMetadata

Sequence = tuple[list[int], list[bool]]  # token ids, supervised mask (same length)


@dataclass
class Packed:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long, restarting at 0 per sequence
    meta: PackedMetadata
    rows: torch.Tensor  # [N] long: rows whose next token is supervised
    targets: torch.Tensor  # [N] long: that next token
    sequence_of_row: torch.Tensor  # [N] long: which of the pack's sequences each row belongs to

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_sequences(self) -> int:
        return len(self.meta.seq_lens)


def supervised_tokens(seq: Sequence) -> int:
    """Tokens a sequence trains on (its first token has no row predicting it)."""
    return sum(seq[1][1:])


def pack(
    seqs: list[Sequence], device: torch.device | str = "cpu", sliding_window: int | None = None
) -> Packed:
    ids, rows, targets, owner, start = [], [], [], [], 0
    for s, (tokens, mask) in enumerate(seqs):
        if len(tokens) != len(mask):
            raise ValueError(f"sequence {s}: {len(tokens)} tokens but {len(mask)} labels")
        ids.extend(tokens)
        for j in range(1, len(tokens)):
            if mask[j]:
                rows.append(start + j - 1)
                targets.append(tokens[j])
                owner.append(s)
        start += len(tokens)
    meta = PackedMetadata([len(t) for t, _ in seqs], sliding_window)
    long = dict(dtype=torch.long, device=device)
    return Packed(
        torch.tensor(ids, **long),
        meta.positions.to(device),
        meta,
        torch.tensor(rows, **long),
        torch.tensor(targets, **long),
        torch.tensor(owner, **long),
    )


def split_by_tokens(groups: list[list[Sequence]], max_tokens: int) -> list[list[Sequence]]:
    """Cut each group of sequences into runs of at most max_tokens tokens, never splitting a group
    (a DPO pair is a group of two; an SFT example a group of one); a longer group runs alone."""
    out: list[list[Sequence]] = []
    cur: list[Sequence] = []
    n = 0
    for group in groups:
        size = sum(len(t) for t, _ in group)
        if cur and n + size > max_tokens:
            out.append(cur)
            cur, n = [], 0
        cur.extend(group)
        n += size
    if cur:
        out.append(cur)
    return out
