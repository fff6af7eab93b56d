"""Quantization for CPU decoding: the linear layers read 4-bit or 8-bit weights.

`q4_1` and `q8_0` (the choice on a float32 model, and on any AVX2 CPU) store weights in GGUF's block
formats and run ember's own kernels (ember/kernels/cpu.c): per block of 32 input columns a float16 scale
(and, for q4_1, a float16 minimum), and the activations quantized per block of 32 to int8 on the fly, as
llama.cpp does, so each block's dot product is integer arithmetic. A Q4_1 GGUF (the default model) comes
back with exactly its own weights; its LM head is Q8_0 in the file and q8_0 here. Steps with more than
BLOCK_DENSE_ABOVE_ROWS rows (prefill, large batches) run the block values rounded to float16 through
FBGEMM's GEMM, which wins from there on. Measured on the 2-core AVX2 EPYC, all 30 layers and the head of
the default model, weights streamed from memory, ms per step: 1 row 17.8 (float32 on oneDNN 54.5, int8
27.8), 8 rows 42.7 (float16 GEMM 40.1), 32 rows 173 (107). The float16 copy computes with float activations,
so a step's numerics depend on its row count, as with int4's dense copy below.

The rest of this module uses PyTorch's packed kernels, with bfloat16 activations:

Decoding one token reads every weight once, so on a CPU its speed is the weight bytes over the memory
bandwidth. `int4` stores each decoder-layer projection as 4-bit integers with a scale and a zero per group
of 32 input columns (asymmetric round-to-nearest on the group's min and max) and the LM head as int8 with a
scale per output row; activations stay bfloat16. The matmuls are PyTorch's packed kernels
(`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`), which dequantize tile by tile in registers.

The packed kernels are matrix-vector kernels at heart: their time grows with every row of activations,
while a dense bfloat16 GEMM reuses each weight across rows. Measured on the 2-core CPU, per decoder layer
of the default model: 140 vs 337 us at 1 row, 220 vs 349 at 4, but 794 vs 551 at 16 and 11.6 vs 4.8 ms
at 256. So each layer also keeps its dequantized weight in bfloat16 (the same values, more memory) and
steps with more than DENSE_ABOVE_ROWS rows (prefill, large decode batches) use that instead.

`int8` stores every projection (and the LM head) as int8 with a scale per output row and works in a
float32 model too: decode steps round their few activation rows to bfloat16 for `_weight_int8pack_mm`
(its fp32 path is ten times slower), many-row steps use a dense copy in the model's dtype. It is the
setting for CPUs without native bfloat16 (AVX2 only), where bfloat16 GEMMs are emulated and int4's
prefill crawls. Measured on an AVX2-only 2-core EPYC, default model, one sequence, prompt of 256 tokens:
float32 88 ms per decode step and 740 ms prefill; float32 + int8 58 ms and 670 ms; bfloat16 + int4 50 ms
and 3,600 ms.

A GGUF Q4_1 tensor has this format: the min and max of each group of 32 map to codes 0 and 15, so the
codes come out exactly as llama.cpp stores them; the scales and zeros are held in bfloat16 (the kernel's
requirement), which moves the grid by a few percent of a step. The tied LM head of the default model is
Q8_0 in the GGUF (a scale per 32 values) and is re-quantized here with a scale per row. The dense copy
rounds the grid to bfloat16, so a step that crosses the row threshold computes with very slightly
different weights: greedy outputs can differ between a lightly and a heavily loaded engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels import cpu
from ember.models.llama import swap_projections

GROUP_SIZE = 32
DENSE_ABOVE_ROWS = 8
QUANTIZATIONS = ("int4", "int8", "q4_1", "q8_0")
BLOCK_FORMATS = ("q4_1", "q8_0")  # ember's own kernels (ember/kernels/cpu.c), float32 activations
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


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    if k % GROUP_SIZE:
        raise ValueError(f"block quantization needs the input size ({k}) to be a multiple of {GROUP_SIZE}")
    return weight.detach().float().view(n, k // GROUP_SIZE, GROUP_SIZE)


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
    return (codes.view(n, -1, GROUP_SIZE).float() * d.float().unsqueeze(-1)).view(n, -1)


class BlockQuantLinear(nn.Module):
    """y = x @ W.T (+ b) with W in GGUF's q4_1 or q8_0 blocks; x [T, K] float32 -> [T, N] float32.

    ember's AVX2 kernel quantizes x per block of 32 to int8 (one scale per block, as llama.cpp does) and
    takes every block's dot product in integer arithmetic; ember.kernels.cpu builds it on first use.
    """

    def __init__(self, linear: nn.Linear, fmt: str, dense_copy: bool = False):
        super().__init__()
        if (reason := cpu.unavailable_reason()) is not None:
            raise ValueError(f"quantization {fmt}: {reason}")
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
        # Many-row steps (prefill) on a float16 copy of the block values through FBGEMM's GEMM: the block
        # kernel is a matrix-vector kernel at heart and loses to a real GEMM from about 8 rows.
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
            self._kernel = cpu.QuantLinear(self.fmt, self.codes, self.d, self.m, self.bias)
        return self._kernel(x.contiguous())


def quantize_model(model: nn.Module, method: str) -> None:
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
            lambda lin: BlockQuantLinear(lin, method, dense_copy=True),
            lambda lin: BlockQuantLinear(lin, "q8_0"),  # the head reads the few rows to be sampled
        )
        return
    swap_projections(model, Int4Linear if method == "int4" else Int8Linear, Int8Linear)
