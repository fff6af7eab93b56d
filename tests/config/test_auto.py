"""ember.config.auto: `auto` resolves to a setting the engine runs, by what this CPU has, and says why."""

from __future__ import annotations

import pytest

from ember.config import EngineConfig, engine_config
from ember.config import auto as auto_mod
from ember.config.auto import choose
from ember.config.schema import to_plain

AVX512 = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"})
AVX2 = frozenset({"avx2", "fma", "f16c"})


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with `flags` whose block kernels do (missing=None) or do not run."""

    def pretend(flags: frozenset[str], missing: str | None = None) -> None:
        monkeypatch.setattr(auto_mod, "cpu_flags", lambda: flags)
        monkeypatch.setattr(auto_mod, "block_kernels_unavailable", lambda: missing)

    return pretend


def test_block_kernels_win_where_they_run(cpu):
    cpu(AVX512)
    c = choose("cpu", "auto", "auto")
    assert (c.quantization, c.dtype) == ("q4_1", "float32")
    assert "avx512_bf16" in c.reason and "block kernels" in c.reason


def test_without_block_kernels_int8_even_with_native_bf16(cpu):
    # int8 with float32 activations measured ahead of int4 with bfloat16 on an AVX512-BF16/AMX Xeon
    cpu(AVX512, missing="no C compiler")
    c = choose("cpu", "auto", "auto")
    assert (c.quantization, c.dtype) == ("int8", "float32") and "no C compiler" in c.reason


def test_a_given_half_is_kept(cpu):
    cpu(AVX2)
    assert choose("cpu", "auto", "bfloat16").quantization == "int4"
    assert choose("cpu", "auto", "float16").quantization is None
    assert choose("cpu", "int4", "auto").dtype == "bfloat16"
    assert choose("cpu", None, "auto").dtype == "float32"
    cpu(AVX2, missing="no C compiler")
    assert choose("cpu", "auto", "float32").quantization == "int8"


def test_off_the_cpu_no_quantization():
    c = choose("cuda", "auto", "auto")
    assert (c.quantization, c.dtype) == (None, "bfloat16")


def test_config_resolves_auto_and_keeps_the_reason(cpu):
    cpu(AVX2)
    c = engine_config(quantization="auto")
    assert (c.quantization, c.dtype) == ("q4_1", "float32")
    assert c.auto_choice is not None and "block kernels" in c.auto_choice.reason
    assert to_plain(c)["quantization"] == "q4_1" and "auto_choice" not in to_plain(c)


def test_default_is_the_exact_reference():
    c = EngineConfig()
    assert (c.quantization, c.dtype, c.auto_choice) == (None, "float32", None)
