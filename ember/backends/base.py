"""What a kernel backend provides: the model's hot ops, bound for eager calls, and the KV cache layout.

A backend is picked once per model (ember.backends.registry.select_backend) and the modules take their ops
from it when they are built; the call sites then hold plain callables, so an eager decode step pays no
dispatch beyond a Python call (see benchmarks/BACKENDS.md for why not the custom ops there). The same ops
are registered as `torch.ops.ember.*` custom ops (ember.backends.ops), the entry points torch.compile sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ember.models.attention import AttentionMetadata
from ember.models.config import ModelConfig

# x [M, K] float32 -> [M, N] float32: a block-quantized weight bound once (see Backend.block_linear)
BoundLinear = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KVCacheLayout:
    """Per layer, one K and one V tensor of shape(num_blocks) in `dtype`.

    Heads lead ([Hkv, num_blocks, block_size, D]) so that gathering a sequence's blocks yields [Hkv, L, D],
    what the attention matmuls read, with no transposing copy; a GPU backend may order it otherwise.
    """

    num_layers: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: torch.dtype

    def shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        return (self.num_kv_heads, num_blocks, self.block_size, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """K and V of every layer for one block of tokens."""
        per_token = 2 * self.num_layers * self.num_kv_heads * self.head_dim
        return per_token * self.block_size * torch.empty((), dtype=self.dtype).element_size()

    block_dim = 1  # the dimension that indexes blocks

    def copy_blocks(
        self, caches: list[tuple[torch.Tensor, torch.Tensor]], src: torch.Tensor, dst: torch.Tensor
    ) -> None:
        """Copy blocks src[i] -> dst[i] (long [n] each) in every layer's K and V."""
        for k, v in caches:
            k.index_copy_(self.block_dim, dst, k.index_select(self.block_dim, src))
            v.index_copy_(self.block_dim, dst, v.index_select(self.block_dim, src))

    def allocate(self, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = self.shape(num_blocks)
        return [
            (
                torch.zeros(shape, dtype=self.dtype, device=device),
                torch.zeros(shape, dtype=self.dtype, device=device),
            )
            for _ in range(self.num_layers)
        ]


class Backend:
    """The ops a model runs with. Subclasses set them as plain functions (staticmethod), so a module can
    hold `backend.rms_norm` and call it with nothing in between."""

    name: str = "abstract"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, H], weight [H] -> weight * x / sqrt(mean(x^2) + eps), [T, H]."""
        raise NotImplementedError

    @staticmethod
    def add_rms_norm(
        x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and the norm after it: x, h [T, H] -> (x + h, rms_norm(x + h)), new tensors."""
        raise NotImplementedError

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU on the fused gate-up projection's output: [T, 2I] (gate, then up) -> silu(gate) * up."""
        raise NotImplementedError

    @staticmethod
    def rope_write_kv(
        qkv: torch.Tensor,  # [T, (Hq + 2 * Hkv) * D], the fused projection's output
        cos: torch.Tensor,  # [T, D]
        sin: torch.Tensor,  # [T, D]
        slots: torch.Tensor,  # [T] int64: block_id * block_size + offset
        k_cache: torch.Tensor,  # one layer's K blocks, in kv_cache_layout's shape: written
        v_cache: torch.Tensor,  # written
        num_heads: int,
    ) -> torch.Tensor:
        """Rotate q and k, write k and v into their cache slots; -> rotated q [T, Hq, D]."""
        raise NotImplementedError

    @staticmethod
    def decode_attention(
        q: torch.Tensor,  # [B, Hq, D], one query per decoding sequence
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,  # its decode_* fields describe the B sequences
        scale: float,
        out: torch.Tensor,  # [B, Hq, D], contiguous: written
    ) -> None:
        raise NotImplementedError

    @staticmethod
    def block_linear(
        fmt: str,  # "q4_1" or "q8_0"
        codes: torch.Tensor,  # q4_1: [N, K / 2] uint8; q8_0: [N, K] int8
        d: torch.Tensor,  # [N, K / 32] float16 bits (int16)
        m: torch.Tensor | None,  # q4_1: [N, K / 32] float16 bits (int16)
        bias: torch.Tensor | None,  # [N] float32
    ) -> BoundLinear:
        """The block-quantized linear bound to one weight: activations quantized per block of 32 to int8
        (as llama.cpp does), y = x_q @ W.T (+ bias). Binding once keeps a call's work to the activations."""
        raise NotImplementedError

    def kv_cache_layout(self, cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> KVCacheLayout:
        return KVCacheLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, block_size, cfg.head_dim, dtype)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} '{self.name}'>"
