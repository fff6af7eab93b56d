"""Build and load ember's C kernels for the CPU (cpu.c) on first use.

The source ships with the package; the first process that needs it compiles it with the machine's C
compiler (`$CC`, else `cc`) into ember's cache directory, keyed by a hash of the source, the flags and the
compiler, and later processes load that library. It is linked against OpenMP, whose runtime torch has
already loaded, so its loops share torch's threads (and follow `torch.set_num_threads`).

Needs x86-64 with AVX2, FMA and F16C, and a C compiler; `unavailable_reason()` says what is missing.
The block-quantized linear layers also have an AVX-512 VNNI version, chosen at run time where the CPU has
the flags (`isa()`); `EMBER_CPU_ISA=avx2` keeps the AVX2 one (as the tests do, so both stay tested).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ember.paths import ember_cache_dir

SOURCE = Path(__file__).with_name("cpu.c")
FLAGS = [
    "-O3",
    "-mavx2",
    "-mfma",
    "-mf16c",
    "-fopenmp",
    "-fPIC",
    "-shared",
    "-Wl,--no-undefined",
    "-Werror=implicit-function-declaration",
]
CPU_FLAGS = ("avx2", "fma", "f16c")
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
ISAS = ("avx2", "avx512")
FORMATS = {"q4_1": 0, "q8_0": 1}
F32 = torch.float32


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


@functools.cache
def unavailable_reason() -> str | None:
    """None when the kernels run here; else why not, in words."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"ember's CPU kernels need x86-64 (this is {platform.machine()})"
    flags = _cpu_flags()
    missing = [f for f in CPU_FLAGS if flags is not None and f not in flags]
    if missing or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"ember's CPU kernels need AVX2, FMA and F16C (this CPU lacks {', '.join(missing) or 'AVX2'})"
    try:
        _library()
    except (OSError, RuntimeError) as e:
        return str(e)
    return None


def isa(requested: str | None = None) -> str:
    """The instruction set the block kernels run with: `requested`, else $EMBER_CPU_ISA, else the widest
    this CPU has ("avx512" with AVX-512 F/BW/VL/DQ and VNNI, else "avx2")."""
    want = requested or os.environ.get("EMBER_CPU_ISA") or None
    if want is not None and want not in ISAS:
        raise ValueError(f"unknown CPU instruction set '{want}' (EMBER_CPU_ISA); known: {', '.join(ISAS)}")
    flags = _cpu_flags() or set()
    has_avx512 = all(f in flags for f in AVX512_FLAGS)
    if want == "avx512" and not has_avx512:
        missing = [f for f in AVX512_FLAGS if f not in flags]
        raise ValueError(f"the avx512 kernels need {', '.join(missing)}, which this CPU lacks")
    return want or ("avx512" if has_avx512 else "avx2")


def available() -> bool:
    return unavailable_reason() is None


@functools.cache
def _library() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"ember's CPU kernels are built on first use, and no C compiler '{compiler}' is here"
        )
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    out_dir = ember_cache_dir() / "kernels"
    path = out_dir / f"cpu-{key}.so"
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        # Compile next to the target and rename: processes building at once never load a half-written file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            proc = subprocess.run(
                [compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise RuntimeError(f"building ember's CPU kernels failed:\n{proc.stderr.strip()[-2000:]}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    fn = lib.ember_quant_linear
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    fn.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    lib.ember_quant_linear_avx512.argtypes, lib.ember_quant_linear_avx512.restype = fn.argtypes, fn.restype
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.ember_add_rms_norm.argtypes = [ptr, ptr, ptr, f32, i64, i64, ptr, ptr]
    lib.ember_silu_mul.argtypes = [ptr, i64, i64, ptr]
    lib.ember_rms_norm.argtypes = [ptr, ptr, f32, i64, i64, ptr]
    lib.ember_rope_write_kv.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, ptr]
    lib.ember_decode_attention.argtypes = [
        ptr,
        ptr,
        ptr,
        i64,
        i64,
        ptr,
        i64,
        ptr,
        i64,
        i64,
        i64,
        i64,
        i64,
        f32,
    ]
    lib.ember_decode_attention.argtypes += [ptr]
    for fn in (
        lib.ember_rms_norm,
        lib.ember_add_rms_norm,
        lib.ember_silu_mul,
        lib.ember_rope_write_kv,
        lib.ember_decode_attention,
    ):
        fn.restype = None
    return lib


class QuantLinear:
    """The block-quantized linear kernel bound to one weight: y [M, N] float32 = x [M, K] @ W.T (+ bias).

    Binding once keeps a call's Python work to the activations and the output, which matters at one row:
    a decode step makes four such calls per layer. `isa` picks the kernel (default: `isa()`).
    """

    def __init__(
        self,
        fmt: str,
        codes: torch.Tensor,  # q4_1: [N, K / 2] uint8; q8_0: [N, K] int8
        d: torch.Tensor,  # [N, K / 32] float16 bits (int16)
        m: torch.Tensor | None,  # q4_1: [N, K / 32] float16 bits (int16)
        bias: torch.Tensor | None,  # [N] float32
        isa: str | None = None,
    ):
        self.isa = globals()["isa"](isa)
        self.n = codes.shape[0]
        self.k = codes.shape[1] * (2 if fmt == "q4_1" else 1)
        self._keep = (codes, d, m, bias)  # the pointers below stay valid while these live
        lib = _library()
        self._fn = lib.ember_quant_linear_avx512 if self.isa == "avx512" else lib.ember_quant_linear
        self._format = FORMATS[fmt]
        self._weights = (
            codes.data_ptr(),
            d.data_ptr(),
            None if m is None else m.data_ptr(),
            self.n,
            None if bias is None else bias.data_ptr(),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [M, K] float32, contiguous
        if x.dim() != 2 or x.shape[1] != self.k:
            raise ValueError(f"expected activations [rows, {self.k}], got {tuple(x.shape)}")
        rows = x.shape[0]
        y = torch.empty(rows, self.n, dtype=F32)
        if self._fn(self._format, x.data_ptr(), rows, self.k, *self._weights, y.data_ptr()):
            raise MemoryError(f"ember_quant_linear could not allocate its scratch for {rows} x {self.k}")
        return y


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for cache in (k_cache, v_cache):
        if cache.dtype != F32 or not cache.is_contiguous():
            raise ValueError("the CPU kernels read a contiguous float32 KV cache")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] float32 -> weight * x / sqrt(mean(x^2) + eps), row by row."""
    if x.dtype != F32 or x.dim() != 2 or weight.shape != (x.shape[1],) or not weight.is_contiguous():
        raise ValueError(f"rms_norm takes float32 [T, H] and a weight [H] (got {tuple(x.shape)})")
    x = x.contiguous()
    out = torch.empty_like(x)
    _library().ember_rms_norm(x.data_ptr(), weight.data_ptr(), eps, x.shape[0], x.shape[1], out.data_ptr())
    return out


def add_rms_norm(
    x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the norm after it in one pass: -> (x + h, rms_norm(x + h)), both [T, H]."""
    if not (
        x.dtype == h.dtype == F32 and x.dim() == 2 and h.shape == x.shape and weight.shape == (x.shape[1],)
    ):
        raise ValueError(f"add_rms_norm takes float32 [T, H] twice and a weight [H] (got {tuple(x.shape)})")
    x, h = x.contiguous(), h.contiguous()
    s, out = torch.empty_like(x), torch.empty_like(x)
    _library().ember_add_rms_norm(
        x.data_ptr(),
        h.data_ptr(),
        weight.data_ptr(),
        eps,
        x.shape[0],
        x.shape[1],
        s.data_ptr(),
        out.data_ptr(),
    )
    return s, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on the fused gate-up output: [T, 2I] (gate, then up) -> silu(gate) * up, [T, I]."""
    if gate_up.dtype != F32 or gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul takes float32 [T, 2I] (got {tuple(gate_up.shape)})")
    gate_up = gate_up.contiguous()
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=F32)
    _library().ember_silu_mul(gate_up.data_ptr(), gate_up.shape[0], out.shape[1], out.data_ptr())
    return out


def rope_write_kv(
    qkv: torch.Tensor,  # [T, (Hq + 2 * Hkv) * D] float32, the fused projection's output
    cos: torch.Tensor,  # [T, D]
    sin: torch.Tensor,
    slots: torch.Tensor,  # [T] int64
    k_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, D]
    v_cache: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """Rotate q and k, write k and v to their cache slots; returns the rotated q [T, Hq, D]."""
    hkv, d = k_cache.shape[0], k_cache.shape[-1]
    t = qkv.shape[0]
    _check_cache(k_cache, v_cache)
    if qkv.dtype != F32 or qkv.shape[1] != (num_heads + 2 * hkv) * d or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be float32 [T, {(num_heads + 2 * hkv) * d}] with unit column stride")
    slots = slots.contiguous().long()
    q = torch.empty(t, num_heads, d, dtype=F32)
    cos, sin = cos.contiguous(), sin.contiguous()
    _library().ember_rope_write_kv(
        qkv.data_ptr(),
        qkv.stride(0),
        cos.data_ptr(),
        sin.data_ptr(),
        slots.data_ptr(),
        t,
        num_heads,
        hkv,
        d,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[1] * k_cache.shape[2],
        q.data_ptr(),
    )
    return q


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D] float32, contiguous
    k_cache: torch.Tensor,  # [Hkv, num_blocks, block_size, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    context_lens: torch.Tensor,  # [B] int64
    window: int | None,
    scale: float,
    out: torch.Tensor,  # [B, Hq, D] float32, contiguous: written
) -> None:
    b, hq, d = q.shape
    _check_cache(k_cache, v_cache)
    if not (q.dtype == out.dtype == F32 and q.is_contiguous() and out.is_contiguous()):
        raise ValueError("decode attention reads and writes contiguous float32 [B, Hq, D] tensors")
    block_tables, context_lens = block_tables.contiguous().long(), context_lens.contiguous().long()
    _library().ember_decode_attention(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[1] * k_cache.shape[2],
        k_cache.shape[2],
        block_tables.data_ptr(),
        block_tables.shape[1],
        context_lens.data_ptr(),
        b,
        hq,
        k_cache.shape[0],
        d,
        window or 0,
        scale,
        out.data_ptr(),
    )
