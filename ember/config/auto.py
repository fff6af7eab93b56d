"""`--quantization auto` and `--dtype auto`: the fastest setting this machine runs, and why.

A decode step on a CPU reads every weight once, so it is as fast as the weight bytes are few and the
kernel keeps up with the memory. Measured at one stream on the default model with `ember quality`
(benchmarks/QUALITY.md), fastest first: q4_1 (float32 activations) on ember's C block kernels, where they
run (x86-64 with AVX2, FMA, F16C, and a C compiler); then int8 (float32 activations) on PyTorch's packed
kernel, which needs nothing of the CPU, ahead of int4 with bfloat16 even where bfloat16 is native (AVX512-
BF16, AMX). With bfloat16 asked for, int4 is the bfloat16 quantization. Unquantized, float32 is faster than
bfloat16 on a CPU (ember's kernels and oneDNN's packed weights are float32). Off the CPU the quantizations
do not run and bfloat16 is the fast dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"
# The activation dtype each quantization runs with when none is asked for (int8 also takes bfloat16).
NATURAL_DTYPE = {"q4_1": "float32", "q8_0": "float32", "int4": "bfloat16", "int8": "float32", None: "float32"}
# What the start-up log reports of the CPU: the flags the kernels here could use.
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class AutoChoice:
    """What `auto` resolved to on this machine, and the reason, for the start-up log."""

    quantization: str | None
    dtype: str
    reason: str


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux, not x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def block_kernels_unavailable() -> str | None:
    """Why q4_1/q8_0 cannot run here (no C kernels, EMBER_CPU_KERNELS=0), or None where they can."""
    import torch  # here: only resolving `auto` needs torch (and may compile ember's kernels once)

    from ember.backends import select_backend

    try:
        select_backend("cpu", torch.float32, "q4_1")
    except ValueError as exc:
        return str(exc)
    return None


def choose(device: str, quantization: str | None, dtype: str) -> AutoChoice:
    """Resolve whichever of `quantization` and `dtype` is 'auto'; the other is kept as given."""
    if device != "cpu":
        q = None if quantization == AUTO else quantization
        d = "bfloat16" if dtype == AUTO else dtype
        return AutoChoice(q, d, f"on {device} the quantizations do not run and bfloat16 is the fast dtype")
    if quantization != AUTO:
        d = NATURAL_DTYPE[quantization]
        return AutoChoice(quantization, d, f"quantization {quantization or 'none'} runs fastest with {d}")
    flags = cpu_flags()
    seen = f"CPU flags {' '.join(f for f in REPORTED_FLAGS if f in flags) or 'unknown'}"
    if dtype in (AUTO, "float32"):
        missing = block_kernels_unavailable()
        if missing is None:
            from ember.kernels.cpu import isa  # loaded with the backend above

            return AutoChoice(
                "q4_1",
                "float32",
                f"{seen}: ember's C block kernels ({isa().upper()}) run here, and q4_1 weights (4.5 bits) "
                "read the fewest bytes",
            )
        return AutoChoice("int8", "float32", f"{seen}; {missing}; int8 weights on PyTorch's packed kernel")
    if dtype == "bfloat16":
        return AutoChoice("int4", "bfloat16", "int4 is the fastest quantization with bfloat16 activations")
    return AutoChoice(None, dtype, f"no quantization runs with {dtype} activations")
