"""Kernel backends: the model's hot ops (PyTorch reference, ember's CPU C kernels; Triton/CUDA later),
picked by device, dtype and quantization, and the KV cache layout each one reads.

    backend = select_backend(device, dtype, quantization)
    model = LlamaForCausalLM(cfg, backend=backend)        # modules bind backend.rms_norm, ...
    layout = backend.kv_cache_layout(cfg, block_size, dtype)  # what the model runner allocates

Importing this package registers the `torch.ops.ember.*` custom ops (ember.backends.ops).
"""

from ember.backends import ops  # noqa: F401  (registers torch.ops.ember.*)
from ember.backends.base import Backend, BoundLinear, KVCacheLayout
from ember.backends.cpu import CpuBackend
from ember.backends.reference import ReferenceBackend
from ember.backends.registry import CPU, REFERENCE, kernels_overridden, select_backend

__all__ = [
    "CPU",
    "REFERENCE",
    "Backend",
    "BoundLinear",
    "CpuBackend",
    "KVCacheLayout",
    "ReferenceBackend",
    "kernels_overridden",
    "select_backend",
]
