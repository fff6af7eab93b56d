"""Quantization for CPU decoding: the linear layers read 4-bit or 8-bit weights.

Decoding one token reads every weight once, so on a CPU its speed is the weight bytes over the memory
bandwidth; fewer bytes per weight is a faster step. Measurements: benchmarks/KERNELS.md.

- `q4_1`, `q8_0` (float32 models): GGUF's block formats (ember.models.block_formats), computed by the
  model's backend (ember's C kernels on an AVX2 CPU), activations quantized per block of 32 to int8 as
  llama.cpp does. A Q4_1 GGUF comes back with exactly its own weights; its LM head is Q8_0 in the file
  and q8_0 here. The block kernel is a matrix-vector kernel: above BLOCK_DENSE_ABOVE_ROWS rows (prefill,
  large batches) a float16 copy of the block values through FBGEMM's GEMM wins.
- `int4` (bfloat16 models): 4-bit codes with a scale and a zero per group of 32 input columns, the LM head
  int8 per row, through PyTorch's packed kernels (`_weight_int4pack_mm_for_cpu`).
- `int8` (bfloat16 or float32): int8 with a scale per output row (`_weight_int8pack_mm`, bfloat16
  activations); the setting for CPUs without native bfloat16, where int4's bfloat16 prefill crawls.

The packed kernels' time grows with every row while a dense GEMM reuses each weight across rows, so every
quantized layer keeps a dense copy of the values it computes with, used above DENSE_ABOVE_ROWS rows. That
copy computes with float activations (and bfloat16-rounded grids for int4), so a step's numerics depend on
its row count: greedy outputs can differ between a lightly and a heavily loaded engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.backends import Backend, select_backend
from ember.models.block_formats import (
    dequantize_q4_1,
    dequantize_q8_0,
    quantize_q4_1,
    quantize_q8_0,
)
from ember.models.projections import swap_projections

GROUP_SIZE = 32
DENSE_ABOVE_ROWS = 8
QUANTIZATIONS = ("int4", "int8", "q4_1", "q8_0")
BLOCK_FORMATS = ("q4_1", "q8_0")  # computed by the backend's block kernels, float32 activations
BLOCK_DENSE_ABOVE_ROWS = 8


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (codes [N, K] int32 in 0..15, scales_and_zeros [K / group, N, 2] fp32).

    w ≈ (code - 8) * scale + zero, the form the packed kernel reads; zero = min + 8 * scale.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of {group_size}")
    w = weight.float().view(n, k // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-10)  # a constant group gets codes 0 and its value as zero
    codes = torch.round((w - lo) / scale).clamp(0, 15).to(torch.int32).view(n, k)
    zero = lo + 8 * scale
    sz = torch.stack([scale.view(n, -1), zero.view(n, -1)], dim=-1)  # [N, K/g, 2]
    return codes, sz.transpose(0, 1).contiguous()


def dequantize_int4(codes: torch.Tensor, sz: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """The float weight [N, K] the kernel computes with (the reference for tests)."""
    n, k = codes.shape
    scale = sz[..., 0].t().repeat_interleave(group_size, dim=1)  # [N, K]
    zero = sz[..., 1].t().repeat_interleave(group_size, dim=1)
    return (codes.float() - 8) * scale + zero


class Int4Linear(nn.Module):
    """y = x @ W.T (+ b) with W in packed 4-bit groups; x [T, K] bfloat16 -> [T, N]."""

    def __init__(self, linear: nn.Linear, group_size: int = GROUP_SIZE):
        super().__init__()
        codes, sz = quantize_int4(linear.weight.detach(), group_size)
        sz_bf16 = sz.to(torch.bfloat16)
        self.group_size = group_size
        self.out_features = linear.out_features
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.register_buffer("scales_and_zeros", sz_bf16)
        # The grid the kernel computes with, as a dense matrix for many-row steps.
        self.register_buffer("dense", dequantize_int4(codes, sz_bf16.float(), group_size).to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > DENSE_ABOVE_ROWS:
            return F.linear(x, self.dense, self.bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """y = x @ W.T with W int8 and one scale per output row; x [T, K] bfloat16 -> [T, N]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        # What the packed kernel reads, kept out of the buffers: a float32 model's `.to()` converts those,
        # and converting back on every decode call would add an op per layer to the hot path.
        self.kernel_scale = self.scale.clone()
        self.register_buffer(
            "dense", (self.weight_int8.float() * self.scale.float()[:, None]).to(torch.bfloat16)
        )
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > DENSE_ABOVE_ROWS:
            return F.linear(x, self.dense, self.bias)
        # The packed kernel is fast with bfloat16 activations only (an fp32 model rounds them for it).
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight_int8, self.kernel_scale).to(
            x.dtype
        )
        return y if self.bias is None else y + self.bias


class BlockQuantLinear(nn.Module):
    """y = x @ W.T (+ b) with W in GGUF's q4_1 or q8_0 blocks; x [T, K] float32 -> [T, N] float32.

    The backend's block kernel quantizes x per block of 32 to int8 and takes every block's dot product in
    integer arithmetic; `backend` defaults to the registry's choice for float32 on the CPU, which refuses
    the formats (with the reason) where no backend computes them.
    """

    def __init__(self, linear: nn.Linear, fmt: str, dense_copy: bool = False, backend: Backend | None = None):
        super().__init__()
        self.backend = backend or select_backend("cpu", torch.float32, fmt)
        self.fmt, self.in_features, self.out_features = fmt, linear.in_features, linear.out_features
        self._kernel = None  # bound on the first call, once the model has its final buffers
        if fmt == "q4_1":
            codes, d, m = quantize_q4_1(linear.weight)
        else:
            (codes, d), m = quantize_q8_0(linear.weight), None
        # Integer views of the float16 scales: a model's `.to(dtype)` leaves integer buffers alone.
        self.register_buffer("codes", codes)
        self.register_buffer("d", d.view(torch.int16))
        self.register_buffer("m", None if m is None else m.view(torch.int16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float())
        # Many-row steps (prefill) on a float16 copy of the block values through FBGEMM's GEMM.
        self.dense = None
        if dense_copy and "fbgemm" in torch.backends.quantized.supported_engines:
            self.dense = torch.ops.quantized.linear_prepack_fp16(self.weight, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """[N, K] float32: the values the kernel computes with (a copy, to read)."""
        d = self.d.view(torch.float16)
        if self.fmt == "q4_1":
            return dequantize_q4_1(self.codes, d, self.m.view(torch.float16))
        return dequantize_q8_0(self.codes, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"quantization {self.fmt} computes with float32 activations (got {x.dtype})")
        if self.dense is not None and x.shape[0] > BLOCK_DENSE_ABOVE_ROWS:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.dense)
        if self._kernel is None:
            self._kernel = self.backend.block_linear(self.fmt, self.codes, self.d, self.m, self.bias)
        return self._kernel(x.contiguous())


def quantize_model(model: nn.Module, method: str, backend: Backend | None = None) -> None:
    """Swap the model's projections for quantized ones in place (CPU).

    int4 computes with bfloat16 activations, int8 with bfloat16 or float32, q4_1 and q8_0 with float32.
    The embedding table keeps its dtype (a lookup reads one row per token); a tied LM head gets its own
    int8 copy (q8_0 blocks for the block formats, as a GGUF stores it).
    """
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization '{method}'; known: {', '.join(QUANTIZATIONS)}")
    if method == "int4" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise ValueError(f"int4 needs torch 2.6 or newer for its CPU kernels (this is {torch.__version__})")
    if method in BLOCK_FORMATS:
        swap_projections(
            model,
            lambda lin: BlockQuantLinear(lin, method, dense_copy=True, backend=backend),
            lambda lin: BlockQuantLinear(lin, "q8_0", backend=backend),  # the head reads the rows to sample
        )
        return
    swap_projections(model, Int4Linear if method == "int4" else Int8Linear, Int8Linear)
