"""Dense projections on the CPU through oneDNN, with weights reordered once into its blocked layout.

`F.linear` on the CPU calls MKL's sgemm, whose small-M kernels are slow on AVX2 machines: steps of 2 to 8
rows (small decode batches, speculative verification) cost two to three times a 1-row step. oneDNN's
matmul on a weight reordered ahead of time reads the same values in a cache-friendly order and wins on the
whole model at every batch size; small weights at one row lose a little. Measurements:
benchmarks/KERNELS.md (`benchmarks/packed_linear.py`).

Results agree with F.linear to float32 rounding (a relative 1e-6), not bit for bit: the sums run in
another order. The reordered weight replaces the dense one, so memory does not grow, except for an LM head
tied to the embedding table, which keeps the table for lookups.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ember.models.projections import swap_projections


@functools.cache
def packing_available() -> bool:
    """oneDNN is in this torch build and its packed linear runs here (probed once, on a tiny weight)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        linear = nn.Linear(8, 4)
        got = PackedLinear(linear)(torch.ones(2, 8))
        return torch.allclose(got, linear(torch.ones(2, 8)), atol=1e-5)
    except (RuntimeError, NotImplementedError):
        return False


class PackedLinear(nn.Module):
    """y = x @ W.T (+ b); x [T, in] -> [T, out], float32 on the CPU."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A plain attribute, not a buffer: `.to()` and state_dict() know nothing of oneDNN's layout.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach())

    @property
    def weight(self) -> torch.Tensor:
        """[out, in]: a dense copy, to read (editing it changes nothing; unpack_model first)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def unpacked(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def pack_model(model: nn.Module) -> None:
    """Swap a float32 CPU model's dense projections and LM head for packed ones, in place."""
    swap_projections(model, PackedLinear)


def unpack_model(model: nn.Module) -> None:
    """Back to nn.Linear everywhere, for tools and tests that edit weights in place."""
    swap_projections(model, lambda m: m.unpacked() if isinstance(m, PackedLinear) else m)
