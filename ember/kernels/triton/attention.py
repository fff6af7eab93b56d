"""Paged attention in Triton: decode (one query per sequence, split over the context, flash-decoding
style) and prefill chunks over a cached prefix, both reading K and V through each sequence's block table.

The cache is the reference layout, [Hkv, num_blocks, block_size, D] per layer: one KV block of one head is
a contiguous [block_size, D] tile, so every tile load is one coalesced read. Grouped query heads are
computed together against the KV head they share (the tile is read once for the whole group), padded to
the 16 rows a tensor-core dot needs. Softmax runs online in float32 with exp2 (scores pre-scaled by
log2(e)), so no [B, L] score matrix ever reaches memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.triton import interpreted
from ember.kernels.triton.common import UPCAST_DOT, dot

LOG2E = 1.4426950408889634


def _num_splits(batch: int, num_kv_heads: int, max_blocks: int) -> int:
    # Enough programs to fill the GPU's ~132 multiprocessors a few times over, never more splits than blocks.
    want = max(1, 512 // max(1, batch * num_kv_heads))
    return max(1, min(want, max_blocks, 64))


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [Hkv, NB, BS, D]
    v_ptr,
    tables_ptr,  # [B, MAXB] int
    lens_ptr,  # [B] int
    m_ptr,  # [B, Hq, S] float32: running max of each split
    l_ptr,  # [B, Hq, S] float32: sum of exp
    acc_ptr,  # [B, Hq, S, D] float32: unnormalised output
    scale_log2,
    window,  # 0: none
    stride_qb,
    stride_qh,
    stride_kh,
    stride_kb,
    stride_ks,
    stride_tb,
    max_blocks,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BS: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(lens_ptr + b).to(tl.int32)
    n_blocks = tl.cdiv(ctx, BS)
    per_split = tl.cdiv(max_blocks, SPLITS)
    first = s * per_split
    last = tl.minimum(first + per_split, n_blocks)
    # Branch-free, so `first` keeps one type whichever way it goes (the compiler requires it).
    first = tl.where(window > 0, tl.maximum(first, (ctx - window) // BS), first)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    t = tl.arange(0, BS)
    heads = h * GROUP + g
    g_ok = g < GROUP
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0
    )

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for blk in range(first, last):
        phys = tl.load(tables_ptr + b * stride_tb + blk).to(tl.int64)
        tile = h * stride_kh + phys * stride_kb + t[:, None] * stride_ks + d[None, :]
        k = tl.load(k_ptr + tile)
        v = tl.load(v_ptr + tile)
        scores = dot(q, tl.trans(k), UPCAST) * scale_log2  # [GROUP_PAD, BS], log2 units
        pos = blk * BS + t
        keep = pos < ctx
        if window > 0:
            keep = keep & (pos > ctx - 1 - window)
        scores = tl.where(keep[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A split whose keys are all masked so far keeps m = -inf: subtract 0 then, not -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    row = (b * tl.num_programs(1) * GROUP + heads) * SPLITS + s
    tl.store(m_ptr + row, m_i, mask=g_ok)
    tl.store(l_ptr + row, l_i, mask=g_ok)
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _decode_reduce_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, stride_oh, HQ, D: tl.constexpr, SPLITS: tl.constexpr
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    row = (b * HQ + h) * SPLITS + s
    m = tl.load(m_ptr + row)
    l_s = tl.load(l_ptr + row)
    acc = tl.load(acc_ptr + row[:, None] * D + d[None, :])
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int, padded with any valid block id
    context_lens: torch.Tensor,  # [B] int, each >= 1
    scale: float,
    out: torch.Tensor,  # [B, Hq, D]: written
    window: int | None = None,
    num_splits: int | None = None,
) -> None:
    """Each query over its sequence's cached context. The work splits over (sequence, KV head, context
    split); a second small kernel merges the splits. Reads only the host-known shapes, never the lengths'
    values, so a CUDA graph can capture it at a fixed batch and table width."""
    b, hq, d = q.shape
    hkv, _, bs, _ = k_cache.shape
    group = hq // hkv
    max_blocks = block_tables.shape[1]
    splits = num_splits or _num_splits(b, hkv, max_blocks)
    splits = triton.next_power_of_2(splits)
    q = q.contiguous()
    m = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(b, hkv, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        m,
        lsum,
        acc,
        scale * LOG2E,
        window or 0,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        max_blocks,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BS=bs,
        D=d,
        SPLITS=splits,
        UPCAST=UPCAST_DOT,
    )
    _decode_reduce_kernel[(b, hq)](m, lsum, acc, out, out.stride(0), out.stride(1), hq, D=d, SPLITS=splits)


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [Hkv, NB, BS, D]
    v_ptr,
    out_ptr,  # [T, Hq, D]
    starts_ptr,  # [C] int: first row of each chunk in the flat batch
    qlens_ptr,  # [C] int
    lens_ptr,  # [C] int: context length once the chunk is written
    tables_ptr,  # [C, MAXB] int
    scale_log2,
    window,
    stride_qt,
    stride_qh,
    stride_kh,
    stride_kb,
    stride_ks,
    stride_tb,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BS: tl.constexpr,
    D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    c = tl.program_id(1)
    h = tl.program_id(2)
    qlen = tl.load(qlens_ptr + c).to(tl.int32)
    if tile * BLOCK_M < qlen:
        start = tl.load(starts_ptr + c).to(tl.int32)
        ctx = tl.load(lens_ptr + c).to(tl.int32)
        i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = i < qlen
        q_pos = ctx - qlen + i  # absolute position of each query
        d = tl.arange(0, D)
        t = tl.arange(0, BS)
        rows = (start + i)[:, None] * stride_qt + h * stride_qh + d[None, :]
        q = tl.load(q_ptr + rows, mask=row_ok[:, None], other=0.0)
        kvh = h // GROUP

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # Causal: no key past this tile's last query.
        last_pos = tl.minimum(ctx - qlen + (tile + 1) * BLOCK_M, ctx)
        first = tl.where(window > 0, tl.maximum(0, (ctx - qlen + tile * BLOCK_M - window + 1) // BS), 0)
        for blk in range(first, tl.cdiv(last_pos, BS)):
            phys = tl.load(tables_ptr + c * stride_tb + blk).to(tl.int64)
            kv = kvh * stride_kh + phys * stride_kb + t[:, None] * stride_ks + d[None, :]
            k = tl.load(k_ptr + kv)
            v = tl.load(v_ptr + kv)
            scores = dot(q, tl.trans(k), UPCAST) * scale_log2  # [BLOCK_M, BS]
            k_pos = blk * BS + t
            keep = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < ctx)
            if window > 0:
                keep = keep & (k_pos[None, :] > q_pos[:, None] - window)
            scores = tl.where(keep, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_attention(
    q: torch.Tensor,  # [T, Hq, D]: the whole step's queries (rows of other chunks are left alone)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_starts: torch.Tensor,  # [C] int
    query_lens: torch.Tensor,  # [C] int
    context_lens: torch.Tensor,  # [C] int
    block_tables: torch.Tensor,  # [C, max_blocks] int
    max_query_len: int,
    scale: float,
    out: torch.Tensor,  # [T, Hq, D]: each chunk's rows written
    window: int | None = None,
    block_m: int | None = None,
) -> None:
    """Every prefill chunk of the step in one launch: each query row over its sequence's cached prefix
    plus the chunk itself (already written to the cache), causally. Query tiles of 64 rows on a GPU; of
    16 (the smallest dot) under the interpreter, whose time grows with the padding."""
    block_m = block_m or (16 if interpreted() else 64)
    hq, d = q.shape[1], q.shape[2]
    hkv, _, bs, _ = k_cache.shape
    c = query_lens.shape[0]
    grid = (triton.cdiv(max_query_len, block_m), c, hq)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        query_starts,
        query_lens,
        context_lens,
        block_tables,
        scale * LOG2E,
        window or 0,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=hq // hkv,
        BLOCK_M=block_m,
        BS=bs,
        D=d,
        UPCAST=UPCAST_DOT,
    )
