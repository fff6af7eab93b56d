"""GGUF's block formats q4_1 and q8_0: per block of 32 input columns a float16 scale d (and, for q4_1, a
float16 minimum m). Quantization reads weights into them; the backends compute with them."""

from __future__ import annotations

import torch

BLOCK = 32  # input columns per block


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"block quantization needs the input size ({k}) to be a multiple of {BLOCK}")
    return weight.detach().float().view(n, k // BLOCK, BLOCK)


def quantize_q4_1(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (nibbles [N, K / 2] uint8, d [N, K / 32] fp16, m [N, K / 32] fp16), GGUF's Q4_1.

    w ≈ d * q + m with q in 0..15 from each block's min (m) and max; d and m are rounded to float16 first
    and the codes taken against the rounded values, so a Q4_1 GGUF's weights come back exactly. Byte j of a
    block holds element j in its low nibble and element j + 16 in its high one.
    """
    w = _blocks(weight)
    lo, hi = w.amin(-1), w.amax(-1)
    d, m = ((hi - lo) / 15).half(), lo.half()
    df = d.float().unsqueeze(-1)
    inv = torch.where(df > 0, 1 / df, torch.zeros_like(df))
    codes = torch.round((w - m.float().unsqueeze(-1)) * inv).clamp(0, 15).to(torch.uint8)
    nibbles = codes[..., :16] | (codes[..., 16:] << 4)
    return nibbles.reshape(w.shape[0], -1).contiguous(), d, m


def dequantize_q4_1(nibbles: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = nibbles.shape[0]
    b = nibbles.view(n, -1, 16)
    codes = torch.cat([b & 0x0F, b >> 4], dim=-1).float()  # [N, K / 32, 32]
    return (codes * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)).view(n, -1)


def quantize_q8_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (codes [N, K] int8 in -127..127, d [N, K / 32] fp16), GGUF's Q8_0: w ≈ d * q."""
    w = _blocks(weight)
    d = (w.abs().amax(-1) / 127).half()
    df = d.float().unsqueeze(-1)
    inv = torch.where(df > 0, 1 / df, torch.zeros_like(df))
    codes = torch.round(w * inv).clamp(-127, 127).to(torch.int8)
    return codes.reshape(w.shape[0], -1).contiguous(), d


def dequantize_q8_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    n = codes.shape[0]
    return (codes.view(n, -1, BLOCK).float() * d.float().unsqueeze(-1)).view(n, -1)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 as the block kernels see it: per block of 32, d = max|x| / 127 and codes
    round(x * (1 / d)) in int8, returned dequantized (float32 [M, K]) for the reference's float matmul."""
    b = x.view(x.shape[0], -1, BLOCK)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(b * inv).clamp(-127, 127) * d).view_as(x)
