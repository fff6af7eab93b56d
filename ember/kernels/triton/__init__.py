"""ember's Triton kernels, the CUDA backend's hot ops (ember.backends.cuda).

They run on CUDA tensors, and on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, read when
a kernel module is imported), which is how the test suite checks them on machines without a GPU. Import
the kernel modules only once the environment is set: the registry imports them lazily, when it picks the
CUDA backend.
"""

from __future__ import annotations

import importlib.util
import os


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors) rather than compiling them."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason() -> str | None:
    """None when the Triton kernels can run here; else why not."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install 'ember[gpu]')"
    import torch

    if not torch.cuda.is_available() and not interpreted():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors, slowly)"
    return None
