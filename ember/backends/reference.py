"""The PyTorch reference backend: plain tensor ops on any device and dtype, the numerics others must match."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.backends.base import Backend, BoundLinear
from ember.models.attention import AttentionMetadata, decode_reference, write_kv
from ember.models.block_formats import dequantize_q4_1, dequantize_q8_0, quantize_activations
from ember.models.rope import apply_rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 and scale after casting back, as HF does, so low-precision runs agree too.
    h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * h.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + h
    return s, rms_norm(s, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_write_kv(
    qkv: torch.Tensor,  # [T, (Hq + 2 * Hkv) * D]
    cos: torch.Tensor,  # [T, D]
    sin: torch.Tensor,
    slots: torch.Tensor,  # [T]
    k_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, D]
    v_cache: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    t = qkv.shape[0]
    hkv, d = k_cache.shape[0], k_cache.shape[-1]
    q, k, v = qkv.split([num_heads * d, hkv * d, hkv * d], dim=-1)
    q, k = apply_rotary((cos[:, None], sin[:, None]), q.view(t, num_heads, d), k.view(t, hkv, d))
    write_kv(k_cache, v_cache, k, v.view(t, hkv, d), slots)
    return q  # [T, Hq, D]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    out.copy_(decode_reference(q, k_cache, v_cache, meta, scale))


def block_linear(
    fmt: str, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, bias: torch.Tensor | None
) -> BoundLinear:
    # The block values in float32, once; each call rounds its activations as the C kernel does, so the
    # products are the kernel's up to the order of the float sums.
    half = d.view(torch.float16)
    weight = (
        dequantize_q4_1(codes, half, m.view(torch.float16)) if fmt == "q4_1" else dequantize_q8_0(codes, half)
    )

    def linear(x: torch.Tensor) -> torch.Tensor:  # [M, K] float32 -> [M, N]
        return F.linear(quantize_activations(x), weight, bias)

    return linear


class ReferenceBackend(Backend):
    name = "reference"
    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    silu_mul = staticmethod(silu_mul)
    rope_write_kv = staticmethod(rope_write_kv)
    decode_attention = staticmethod(decode_attention)
    block_linear = staticmethod(block_linear)
