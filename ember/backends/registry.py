"""Which backend runs a model: chosen from (device, dtype, quantization) and what this machine can do."""

from __future__ import annotations

import functools
import os

import torch

from ember.backends import cpu
from ember.backends.base import Backend
from ember.backends.reference import ReferenceBackend

BLOCK_FORMATS = ("q4_1", "q8_0")  # the quantizations only a backend with block kernels computes fast

REFERENCE = ReferenceBackend()
CPU = cpu.CpuBackend()


def kernels_overridden() -> bool:
    """EMBER_CPU_KERNELS=0 runs everything on the PyTorch reference (to compare against, or to debug)."""
    return os.environ.get("EMBER_CPU_KERNELS", "1") == "0"


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA backend (Triton kernels) runs here; else why not."""
    from ember.kernels.triton import unavailable_reason

    if not torch.cuda.is_available():
        return "no CUDA device"
    return unavailable_reason()


@functools.cache
def cuda_backend() -> Backend:
    """The Triton kernels' backend, made on first use: importing the kernels needs triton, and fixes
    whether they run compiled or interpreted (TRITON_INTERPRET, read at import)."""
    from ember.backends.cuda import CudaBackend

    return CudaBackend()


def select_backend(
    device: torch.device | str, dtype: torch.dtype, quantization: str | None = None
) -> Backend:
    """The backend for a model on `device` in `dtype`: ember's C kernels for float32 on a CPU that runs
    them, the Triton kernels on a CUDA device, the reference elsewhere. Block-quantized weights need the
    C kernels unless the reference was asked for: refused, with the reason, where they cannot run."""
    device = torch.device(device)
    if kernels_overridden():
        return REFERENCE
    if device.type == "cpu" and dtype == torch.float32 and _cpu_available():
        return CPU
    if device.type == "cuda" and quantization is None and cuda_unavailable_reason() is None:
        return cuda_backend()
    if quantization in BLOCK_FORMATS:
        raise ValueError(
            f"quantization {quantization}: {cpu.unavailable_reason() or 'needs float32 on the CPU'}"
        )
    return REFERENCE


@functools.cache
def _cpu_available() -> bool:
    return cpu.unavailable_reason() is None
