"""Fused elementwise Triton kernels: RMSNorm with the residual add before it, and SwiGLU's silu(gate) * up.

Each is one read of its inputs and one write of its outputs, where eager PyTorch makes three to five
passes over memory (add, square-mean, scale, cast). The numerics follow the reference backend: the
normalisation in float32, cast back to the activation dtype, then scaled by the weight, as HF does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, H]
    res_ptr,  # [T, H]: x + residual is written here (HAS_RESIDUAL)
    w_ptr,  # [H]
    out_ptr,  # [T, H]
    stride_x,
    stride_r,
    stride_o,
    H,
    eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + t * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + t * stride_r + cols, mask=ok, other=0.0).to(tl.float32)).to(
            res_ptr.dtype.element_ty
        )
        tl.store(res_ptr + t * stride_r + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
    h = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, (w * h).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H], weight [H] -> weight * x / sqrt(mean(x^2) + eps), [T, H]."""
    out = torch.empty_like(x)
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](
            x, x, weight, out, x.stride(0), 0, out.stride(0), x.shape[1], eps,
            BLOCK=triton.next_power_of_2(x.shape[1]), HAS_RESIDUAL=False,
        )  # fmt: skip
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place, [T, H]); -> rms_norm(residual). The decoder layer's `h = h + attn(...)`
    followed by the next norm, in one pass."""
    out = torch.empty_like(x)
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](
            x, residual, weight, out, x.stride(0), residual.stride(0), out.stride(0), x.shape[1], eps,
            BLOCK=triton.next_power_of_2(x.shape[1]), HAS_RESIDUAL=True,
        )  # fmt: skip
    return out


@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, N, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    gate = tl.load(gu_ptr + t * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + t * stride_gu + N + cols, mask=ok, other=0.0).to(tl.float32)
    silu = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + t * stride_o + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * I] (gate first, as gate_up_proj lays it out) -> silu(gate) * up, [T, I]."""
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(t, triton.cdiv(n, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block
        )
    return out
