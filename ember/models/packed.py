"""Dense projections on the CPU through oneDNN, with weights reordered once into its blocked layout.

`F.linear` on the CPU calls MKL's sgemm, whose small-M kernels are slow on these machines (AMD EPYC,
AVX2): a step with 2 to 8 rows of activations costs two to three times a 1-row step, and the LM head's
49152 x 576 product at 5 rows costs 2.4x what it does at one. Those are exactly the steps of a small
decode batch and of speculative verification (k + 1 rows per sequence). oneDNN's matmul on a weight
reordered ahead of time reads the same values in a cache-friendly order. Measured on the 2-core EPYC,
float32, microseconds per call, F.linear -> packed (`benchmarks/packed_linear.py`, one run):

| weight | 1 row | 2 rows | 5 rows | 16 rows | 256 rows |
| --- | ---: | ---: | ---: | ---: | ---: |
| gate_up 3072 x 576 | 221 -> 174 | 510 -> 171 | 810 -> 263 | 2201 -> 528 | 11764 -> 7303 |
| down 576 x 1536 | 100 -> 149 | 226 -> 150 | 352 -> 214 | 704 -> 503 | 4504 -> 4949 |
| LM head 49152 x 576 | 18306 -> 10112 | 38472 -> 11125 | 49033 -> 13454 | 51111 -> 21223 | 257322 -> 198856 |

Small weights at one row lose a little; the whole default model gains: a decode step 114.6 -> 93.3 ms,
a 5-token verification step 210.3 -> 127.1 ms.

Results agree with F.linear to float32 rounding (a relative 1e-6), not bit for bit: the sums run in
another order. The reordered weight replaces the dense one, so memory does not grow, except for an LM head
tied to the embedding table, which keeps the table for lookups.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ember.models.llama import swap_projections


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
