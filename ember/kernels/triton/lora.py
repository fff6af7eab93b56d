"""Batched multi-adapter LoRA in Triton: a segmented gather matmul (Punica's SGMV, S-LoRA's kernel) that
adds every token's own adapter delta, `(x @ A[slot].T) @ B[slot].T`, for a whole mixed batch in two
launches (shrink to rank r, expand back) instead of a Python loop over adapters.

The step's LoRA rows come grouped into segments, one per adapter slot: `rows` lists the token indices
segment by segment, `seg_starts[g]..seg_starts[g + 1]` bounds segment g within it and `seg_slots[g]` is its
slot. Rows with no adapter are in no segment and get nothing. Each program gathers a tile of one
segment's rows, so a prefill's many rows of one adapter are one tensor-core matmul and a decode batch of
many adapters is many small ones, all in one grid; the grid is sized from the shapes alone (the row count
bounds every segment), so nothing is read back to the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.triton.common import UPCAST_DOT, dot


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, K]
    a_ptr,  # [S, R, K]
    rows_ptr,  # [N] int
    starts_ptr,  # [G + 1] int
    slots_ptr,  # [G] int
    tmp_ptr,  # [N, R_PAD] float32: row j of `rows` -> its x @ A.T
    K,
    R,
    stride_x,
    stride_as,
    stride_ar,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
):
    g = tl.program_id(0)
    tile = tl.program_id(1)
    start = tl.load(starts_ptr + g).to(tl.int32)
    n = tl.load(starts_ptr + g + 1).to(tl.int32) - start
    if tile * BLOCK_M < n:
        slot = tl.load(slots_ptr + g).to(tl.int64)
        j = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        j_ok = j < n
        tok = tl.load(rows_ptr + start + j, mask=j_ok, other=0).to(tl.int64)
        r = tl.arange(0, R_PAD)
        acc = tl.zeros([BLOCK_M, R_PAD], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            xs = tl.load(
                x_ptr + tok[:, None] * stride_x + kk[None, :], mask=j_ok[:, None] & k_ok[None, :], other=0.0
            )
            a = tl.load(
                a_ptr + slot * stride_as + r[None, :] * stride_ar + kk[:, None],
                mask=(r[None, :] < R) & k_ok[:, None],
                other=0.0,
            )  # [BLOCK_K, R_PAD]: A[slot].T
            acc += dot(xs, a, UPCAST)
        tl.store(tmp_ptr + (start + j)[:, None] * R_PAD + r[None, :], acc, mask=j_ok[:, None])


@triton.jit
def _expand_kernel(
    tmp_ptr,  # [N, R_PAD] float32
    b_ptr,  # [S, W, R]
    rows_ptr,
    starts_ptr,
    slots_ptr,
    y_ptr,  # [T, W] view (row stride stride_y): the delta is added in place
    W,
    R,
    stride_y,
    stride_bs,
    stride_bw,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
):
    g = tl.program_id(0)
    tile = tl.program_id(1)
    col = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(starts_ptr + g).to(tl.int32)
    n = tl.load(starts_ptr + g + 1).to(tl.int32) - start
    if tile * BLOCK_M < n:
        slot = tl.load(slots_ptr + g).to(tl.int64)
        j = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        j_ok = j < n
        c_ok = col < W
        tok = tl.load(rows_ptr + start + j, mask=j_ok, other=0).to(tl.int64)
        r = tl.arange(0, R_PAD)
        # The rank-r activations rounded to the weights' dtype, as the reference's (x @ A.T) is.
        t = tl.load(tmp_ptr + (start + j)[:, None] * R_PAD + r[None, :], mask=j_ok[:, None], other=0.0)
        t = t.to(b_ptr.dtype.element_ty)
        b = tl.load(
            b_ptr + slot * stride_bs + col[None, :] * stride_bw + r[:, None],
            mask=(r[:, None] < R) & c_ok[None, :],
            other=0.0,
        )  # [R_PAD, BLOCK_N]: B[slot].T
        delta = dot(t, b, UPCAST)
        ptrs = y_ptr + tok[:, None] * stride_y + col[None, :]
        ok = j_ok[:, None] & c_ok[None, :]
        y = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(
            ptrs, (y + delta.to(y_ptr.dtype.element_ty).to(tl.float32)).to(y_ptr.dtype.element_ty), mask=ok
        )


def lora_delta(
    x: torch.Tensor,  # [T, K]
    y: torch.Tensor,  # [T, W], a column slice of the projection's output (unit column stride): updated
    a: torch.Tensor,  # [S, R, K]: every slot's A, zero-padded to rank R
    b: torch.Tensor,  # [S, W, R]: every slot's B (scaling folded in)
    rows: torch.Tensor,  # [N] int: the LoRA rows, segment by segment
    seg_starts: torch.Tensor,  # [G + 1] int
    seg_slots: torch.Tensor,  # [G] int
    block_m: int = 16,
) -> None:
    """y[rows of segment g] += (x[rows] @ a[slot_g].T) @ b[slot_g].T, for every segment, in two launches."""
    n, groups = rows.shape[0], seg_slots.shape[0]
    if n == 0 or groups == 0:
        return
    k, r, w = x.shape[1], a.shape[1], y.shape[1]
    r_pad = max(16, triton.next_power_of_2(r))
    tmp = torch.empty(n, r_pad, dtype=torch.float32, device=x.device)
    m_tiles = triton.cdiv(n, block_m)
    _shrink_kernel[(groups, m_tiles)](
        x, a, rows, seg_starts, seg_slots, tmp, k, r, x.stride(0), a.stride(0), a.stride(1),
        BLOCK_M=block_m, BLOCK_K=min(128, triton.next_power_of_2(k)), R_PAD=r_pad, UPCAST=UPCAST_DOT,
    )  # fmt: skip
    block_n = min(128, triton.next_power_of_2(w))
    _expand_kernel[(groups, m_tiles, triton.cdiv(w, block_n))](
        tmp, b, rows, seg_starts, seg_slots, y, w, r, y.stride(0), b.stride(0), b.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, R_PAD=r_pad, UPCAST=UPCAST_DOT,
    )  # fmt: skip
