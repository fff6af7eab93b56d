"""Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter. The variable is read
when a kernel module is imported, so it is set here, before any test module of this folder imports one."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
