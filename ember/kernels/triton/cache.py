"""RoPE and the KV write in one Triton kernel: q and k rotated (HF's rotate-half layout), k and v stored
into their cache slots, straight from the fused qkv projection's output; one read of qkv, one write of
each result, no intermediate in memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_write_kv_kernel(
    qkv_ptr,  # [T, (Hq + 2 * Hkv) * D]
    cos_ptr,  # [T, D]
    sin_ptr,
    slots_ptr,  # [T] int: block_id * block_size + offset; < 0: padding, not written
    k_ptr,  # [Hkv, NB, BS, D]
    v_ptr,
    q_out_ptr,  # [T, Hq, D]
    stride_qkv,
    stride_cos,
    stride_kh,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    HALF: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)  # 0..Hq-1: a query head; Hq..Hq+Hkv-1: a KV head
    half = HALF
    i = tl.arange(0, HALF)
    cos1 = tl.load(cos_ptr + t * stride_cos + i).to(tl.float32)
    cos2 = tl.load(cos_ptr + t * stride_cos + half + i).to(tl.float32)
    sin1 = tl.load(sin_ptr + t * stride_cos + i).to(tl.float32)
    sin2 = tl.load(sin_ptr + t * stride_cos + half + i).to(tl.float32)
    base = qkv_ptr + t * stride_qkv + h * D
    x1 = tl.load(base + i).to(tl.float32)
    x2 = tl.load(base + half + i).to(tl.float32)
    # rotate_half(x) = [-x2, x1]
    r1 = x1 * cos1 - x2 * sin1
    r2 = x2 * cos2 + x1 * sin2
    if h < HQ:
        dst = q_out_ptr + (t * HQ + h) * D
        tl.store(dst + i, r1.to(q_out_ptr.dtype.element_ty))
        tl.store(dst + half + i, r2.to(q_out_ptr.dtype.element_ty))
    else:
        slot = tl.load(slots_ptr + t).to(tl.int64)
        if slot >= 0:
            kvh = h - HQ
            dst = kvh * stride_kh + slot * D
            tl.store(k_ptr + dst + i, r1.to(k_ptr.dtype.element_ty))
            tl.store(k_ptr + dst + half + i, r2.to(k_ptr.dtype.element_ty))
            v_src = qkv_ptr + t * stride_qkv + (HQ + HKV + kvh) * D
            d = tl.arange(0, D)
            tl.store(v_ptr + dst + d, tl.load(v_src + d))


def rope_write_kv(
    qkv: torch.Tensor,  # [T, (Hq + 2 * Hkv) * D], unit column stride
    cos: torch.Tensor,  # [T, D]
    sin: torch.Tensor,
    slots: torch.Tensor,  # [T] int; negative slots (padded rows of a CUDA graph) are skipped
    k_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, D], contiguous: written
    v_cache: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """-> rotated q [T, Hq, D]."""
    t = qkv.shape[0]
    hkv, d = k_cache.shape[0], k_cache.shape[-1]
    q = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    cos, sin = cos.contiguous(), sin.contiguous()
    _rope_write_kv_kernel[(t, num_heads + hkv)](
        qkv,
        cos,
        sin,
        slots,
        k_cache,
        v_cache,
        q,
        qkv.stride(0),
        cos.stride(0),
        k_cache.stride(0),
        HQ=num_heads,
        HKV=hkv,
        D=d,
        HALF=d // 2,
    )
    return q
