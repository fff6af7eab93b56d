"""What the Triton kernels share: the dot product and how it must run where they run."""

from __future__ import annotations

import triton
import triton.language as tl

from ember.kernels.triton import interpreted

# Triton 3.9's interpreter computes a bfloat16 x bfloat16 dot wrongly (values ~1e10 off on unit-normal
# inputs), so under the interpreter operands are upcast to float32 first; compiled, the low-precision
# operands go to the tensor cores as they are, accumulating in float32 either way.
UPCAST_DOT: bool = interpreted()


@triton.jit
def dot(a, b, UPCAST: tl.constexpr):
    """a [M, K] @ b [K, N] -> float32 [M, N]."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)
