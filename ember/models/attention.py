"""Attention over the paged KV cache: the metadata of a step, and the plain-PyTorch reference math.

A step's flat batch holds decode tokens first (one query per sequence), then prefill chunks (a run of
queries per sequence, possibly after a prefix already in the cache). Keys and values of every new token
are written to their cache slots first; attention then reads each sequence's whole context from its
blocks, so chunked prefill, recompute and cached prefixes all go through the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    query_start: int  # offset of the chunk's first token in the flat batch
    query_len: int
    context_len: int  # tokens of context once this chunk is written (cached prefix + chunk)
    block_table: torch.Tensor  # [num_blocks_of_sequence] long
    sliding_window: int | None = None

    @cached_property
    def allowed(self) -> torch.Tensor:
        """[query_len, context_len] bool; built once per step, read by every layer."""
        device = self.block_table.device
        # Query i sits at absolute position context_len - query_len + i and sees keys at positions <= its own.
        q_pos = torch.arange(self.context_len - self.query_len, self.context_len, device=device)
        k_pos = torch.arange(self.context_len, device=device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.sliding_window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - self.sliding_window
        return allowed


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] long: block_id * block_size + offset of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] long (padded with 0)
    decode_context_lens: torch.Tensor  # [num_decodes] long
    prefills: list[PrefillChunk]
    block_size: int
    sliding_window: int | None = None
    max_decode_len: int = 0  # the longest decode context, on the host (no device sync to read it)

    @cached_property
    def decode_masked(self) -> torch.Tensor:
        """[num_decodes, max_blocks * block_size] bool, True where a key is padding or out of the window;
        built once per step, read by every layer."""
        width = self.decode_block_tables.shape[1] * self.block_size
        key_pos = torch.arange(width, device=self.decode_context_lens.device)
        lens = self.decode_context_lens[:, None]
        masked = key_pos[None, :] >= lens
        if self.sliding_window is not None:
            masked |= key_pos[None, :] <= lens - 1 - self.sliding_window
        return masked

    @cached_property
    def prefill_batch(self) -> PrefillBatch:
        """The prefill chunks as tensors, for kernels that take every chunk of the step in one launch;
        built once per step, read by every layer."""
        device = self.slot_mapping.device
        chunks = self.prefills
        width = max(len(c.block_table) for c in chunks)
        tables = torch.zeros(len(chunks), width, dtype=torch.long, device=device)
        for i, c in enumerate(chunks):
            tables[i, : len(c.block_table)] = c.block_table
        # One copy to the device; each row contiguous, as kernels index them.
        starts, lens, ctx = torch.tensor(
            [[c.query_start for c in chunks], [c.query_len for c in chunks], [c.context_len for c in chunks]],
            dtype=torch.long,
        ).to(device)
        return PrefillBatch(starts, lens, ctx, tables, max(c.query_len for c in chunks))


@dataclass
class PrefillBatch:
    query_starts: torch.Tensor  # [C] long
    query_lens: torch.Tensor  # [C] long
    context_lens: torch.Tensor  # [C] long
    block_tables: torch.Tensor  # [C, max_blocks] long, padded with 0
    max_query_len: int


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """k_cache, v_cache [Hkv, num_blocks, block_size, D]; k, v [T, Hkv, D].

    Heads lead the cache layout so that gathering a sequence's blocks yields [Hkv, L, D] directly, the
    shape the attention matmuls read, with no transposing copy of the whole context.
    """
    hkv, d = k_cache.shape[0], k_cache.shape[-1]
    k_cache.view(hkv, -1, d).index_copy_(1, slots, k.transpose(0, 1))
    v_cache.view(hkv, -1, d).index_copy_(1, slots, v.transpose(0, 1))


@dataclass
class PackedMetadata:
    """Training: whole examples back to back in one flat batch, no KV cache. Each example attends causally
    within itself only (a block-diagonal causal mask), its positions starting from 0."""

    seq_lens: list[int]
    sliding_window: int | None = None

    @cached_property
    def positions(self) -> torch.Tensor:  # [T] long, reset at every example
        return torch.cat([torch.arange(n) for n in self.seq_lens])


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedMetadata, scale: float
) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq, D]: causal SDPA per example (autograd-capable).

    One SDPA call per example rather than one over a [T, T] block-diagonal mask: the mask would cost
    T^2 work and memory where the examples need sum(n^2) (and a GPU's fused kernels take is_causal).
    K and V are expanded to the query heads first, a layout every SDPA backend takes.
    The math runs in float32: on the CPU, SDPA's bfloat16 path (forward and backward) is ~10x slower."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out, start = [], 0
    for n in meta.seq_lens:
        rows = slice(start, start + n)
        mask, causal = None, True
        if meta.sliding_window is not None and n > meta.sliding_window:
            pos = torch.arange(n, device=q.device)
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - meta.sliding_window)
            causal = False
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1),  # [Hq, n, D]
            k[rows].transpose(0, 1),
            v[rows].transpose(0, 1),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
        )
        out.append(o.transpose(0, 1))
        start += n
    return torch.cat(out).to(dtype)


# (q [B, Hq, D], k_cache, v_cache, meta, scale, out [B, Hq, D]) -> None: a backend's decode_attention
DecodeAttention = Callable[..., None]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    decode_attention: DecodeAttention | None = None,
    prefill_attention: DecodeAttention | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D], attending over each sequence's cached context. The decode queries go
    through `decode_attention`, the prefill chunks through `prefill_attention` (the model's backend; the
    reference when None)."""
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd and decode_attention is not None:
        decode_attention(q[:nd], k_cache, v_cache, meta, scale, out[:nd])
    elif nd:
        out[:nd] = decode_reference(q[:nd], k_cache, v_cache, meta, scale)
    if meta.prefills:
        (prefill_attention or prefill_reference)(q, k_cache, v_cache, meta, scale, out)
    return out


def prefill_reference(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
    """The prefill chunks' rows of q [T, Hq, D] -> out's same rows: SDPA per chunk."""
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        out[rows] = _prefill(q[rows], k_cache, v_cache, chunk, scale)


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    # cache [Hkv, num_blocks, bs, D]; block ids [..., nb] -> [Hkv, ..., nb * bs, D]
    # index_select on the flat ids: a third of the time of advanced indexing for decode-sized gathers.
    g = cache.index_select(1, block_table.reshape(-1))
    return g.view(cache.shape[0], *block_table.shape[:-1], -1, cache.shape[-1])


def decode_reference(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D]: each decode query over its sequence's blocks."""
    b, hq, d = q.shape
    hkv = k_cache.shape[0]
    k = _gather(k_cache, meta.decode_block_tables)  # [Hkv, B, L, D]
    v = _gather(v_cache, meta.decode_block_tables)
    # Grouped query heads share one KV head: [Hkv, B, G, D]
    qg = q.view(b, hkv, hq // hkv, d).transpose(0, 1)
    if b == 1 and meta.sliding_window is None:
        # One sequence: its context is a prefix of the gathered blocks, so slice instead of masking.
        n = meta.max_decode_len
        k, v = k[:, :, :n], v[:, :, :n]
        scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [Hkv, 1, G, n]
    else:
        scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [Hkv, B, G, L]
        scores.masked_fill_(meta.decode_masked[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v)  # [Hkv, B, G, D]
    return out.transpose(0, 1).reshape(b, hq, d)


def _prefill(q, k_cache, v_cache, chunk: PrefillChunk, scale: float):
    n_blocks = -(-chunk.context_len // k_cache.shape[2])
    k = _gather(k_cache, chunk.block_table[:n_blocks])[:, : chunk.context_len]  # [Hkv, L, D]
    v = _gather(v_cache, chunk.block_table[:n_blocks])[:, : chunk.context_len]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1),  # [Hq, Tq, D]
        k,
        v,
        attn_mask=chunk.allowed,
        scale=scale,
        enable_gqa=True,
    )
    return o.transpose(0, 1)
