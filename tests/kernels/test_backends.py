"""The backend registry: which backend a model gets, each op's CPU implementation against its reference,
the `torch.ops.ember.*` custom ops, and the KV layout the runner allocates from."""

from __future__ import annotations

import os

import pytest
import torch

from ember.backends import CPU, REFERENCE, KVCacheLayout, registry, select_backend
from ember.backends import cpu as cpu_backend
from ember.engine.model_runner import ModelRunner
from ember.kernels import cpu as kernels
from ember.models.attention import AttentionMetadata
from ember.models.block_formats import quantize_q4_1, quantize_q8_0
from ember.models.config import ModelConfig
from ember.models.llama import RMSNorm
from ember.models.loader import load_model

needs_kernels = pytest.mark.skipif(
    cpu_backend.unavailable_reason() is not None and os.environ.get("EMBER_REQUIRE_CPU_KERNELS") != "1",
    reason=f"{cpu_backend.unavailable_reason()}",
)


@needs_kernels
def test_float32_on_an_avx2_cpu_gets_the_c_kernels(monkeypatch):
    monkeypatch.delenv("EMBER_CPU_KERNELS", raising=False)
    assert select_backend("cpu", torch.float32) is CPU
    assert select_backend("cpu", torch.float32, "q4_1") is CPU


def test_other_dtypes_and_the_override_get_the_reference(monkeypatch):
    monkeypatch.delenv("EMBER_CPU_KERNELS", raising=False)
    assert select_backend("cpu", torch.bfloat16) is REFERENCE
    assert select_backend("cpu", torch.bfloat16, "int4") is REFERENCE
    assert select_backend("meta", torch.float32) is REFERENCE
    monkeypatch.setenv("EMBER_CPU_KERNELS", "0")
    assert select_backend("cpu", torch.float32) is REFERENCE
    assert select_backend("cpu", torch.float32, "q8_0") is REFERENCE  # asked for: the reference math


def test_block_formats_are_refused_with_the_reason_where_the_kernels_cannot_run(monkeypatch):
    monkeypatch.delenv("EMBER_CPU_KERNELS", raising=False)
    monkeypatch.setattr(registry, "_cpu_available", lambda: False)
    monkeypatch.setattr(cpu_backend, "unavailable_reason", lambda: "ember's CPU kernels need AVX2 (test)")
    assert select_backend("cpu", torch.float32) is REFERENCE
    with pytest.raises(ValueError, match=r"quantization q4_1: ember's CPU kernels need AVX2 \(test\)"):
        select_backend("cpu", torch.float32, "q4_1")


def _rope_inputs(t: int, hq: int = 4, hkv: int = 2, d: int = 16, bs: int = 4, blocks: int = 12):
    torch.manual_seed(t)
    qkv = torch.randn(t, (hq + 2 * hkv) * d)
    angles = torch.rand(t, d // 2) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    slots = torch.randperm(blocks * bs)[:t]
    k, v = torch.randn(hkv, blocks, bs, d), torch.randn(hkv, blocks, bs, d)
    return qkv, cos, sin, slots, k, v, hq


def _decode_inputs(
    window: int | None, group: int = 2, hkv: int = 2, d: int = 16, bs: int = 4, blocks: int = 40
):
    torch.manual_seed(group)
    k, v = torch.randn(hkv, blocks, bs, d), torch.randn(hkv, blocks, bs, d)
    lens, order, tables = [1, 9, 30, 17], torch.randperm(blocks).tolist(), []
    for n in lens:
        tables.append(order[: -(-n // bs)])
        order = order[-(-n // bs) :]
    width = max(len(t) for t in tables)
    tables_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    lens_t = torch.tensor(lens)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(lens), dtype=torch.long),
        num_decode_tokens=len(lens),
        decode_block_tables=tables_t,
        decode_context_lens=lens_t,
        prefills=[],
        block_size=bs,
        sliding_window=window,
        max_decode_len=max(lens),
    )
    return torch.randn(len(lens), hkv * group, d), k, v, meta


def _block_weight(fmt: str, n: int = 24, k: int = 96):
    torch.manual_seed(n)
    w = torch.randn(n, k) * 0.1
    if fmt == "q4_1":
        codes, d, m = quantize_q4_1(w)
        return codes, d.view(torch.int16), m.view(torch.int16), torch.randn(n)
    codes, d = quantize_q8_0(w)
    return codes, d.view(torch.int16), None, None


@needs_kernels
@pytest.mark.parametrize("rows", [1, 7])
def test_rms_norm_cpu_equals_reference(rows):
    x, w = torch.randn(rows, 96) * 3, torch.randn(96)
    torch.testing.assert_close(CPU.rms_norm(x, w, 1e-5), REFERENCE.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("t", [1, 5])
def test_rope_write_kv_cpu_equals_reference(t):
    qkv, cos, sin, slots, k, v, hq = _rope_inputs(t)
    k2, v2 = k.clone(), v.clone()
    want = REFERENCE.rope_write_kv(qkv, cos, sin, slots, k, v, hq)
    got = CPU.rope_write_kv(qkv, cos, sin, slots, k2, v2, hq)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k2, k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v2, v, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("window", [None, 7])
def test_decode_attention_cpu_equals_reference(window):
    q, k, v, meta = _decode_inputs(window)
    want, got = torch.empty_like(q), torch.empty_like(q)
    REFERENCE.decode_attention(q, k, v, meta, 0.25, want)
    CPU.decode_attention(q, k, v, meta, 0.25, got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 3])
def test_block_linear_cpu_equals_reference(fmt, rows):
    weight = _block_weight(fmt)
    x = torch.randn(rows, 96)
    want = REFERENCE.block_linear(fmt, *weight)(x)
    got = CPU.block_linear(fmt, *weight)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


HAS_AVX512 = cpu_backend.unavailable_reason() is None and kernels.isa() == "avx512"


@needs_kernels
@pytest.mark.parametrize(
    "isa",
    ["avx2", pytest.param("avx512", marks=pytest.mark.skipif(not HAS_AVX512, reason="no AVX-512 VNNI"))],
)
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_block_linear_each_instruction_set_equals_reference(isa, fmt, rows):
    # 13 weight rows (a tile of 4 and a ragged one) and 5 blocks (the AVX-512 path's odd last block).
    torch.manual_seed(rows)
    w = torch.randn(13, 160)
    codes, d, m = quantize_q4_1(w) if fmt == "q4_1" else (*quantize_q8_0(w), None)
    weight = (codes, d.view(torch.int16), None if m is None else m.view(torch.int16), torch.randn(13))
    x = torch.randn(rows, 160)
    want = REFERENCE.block_linear(fmt, *weight)(x)
    got = kernels.QuantLinear(fmt, *weight, isa=isa)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_kernels
def test_the_instruction_set_follows_the_env_and_refuses_unknown_ones(monkeypatch):
    monkeypatch.setenv("EMBER_CPU_ISA", "avx2")
    assert kernels.isa() == "avx2"
    assert CPU.block_linear("q8_0", *_block_weight("q8_0")).isa == "avx2"
    monkeypatch.setenv("EMBER_CPU_ISA", "sse2")
    with pytest.raises(ValueError, match="unknown CPU instruction set 'sse2'"):
        kernels.isa()
    monkeypatch.delenv("EMBER_CPU_ISA")
    assert kernels.isa() == ("avx512" if HAS_AVX512 else "avx2")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 7])
def test_add_rms_norm_cpu_equals_reference(rows):
    x, h, w = torch.randn(rows, 99) * 3, torch.randn(rows, 99), torch.randn(99)
    for got, want in zip(CPU.add_rms_norm(x, h, w, 1e-5), REFERENCE.add_rms_norm(x, h, w, 1e-5), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3])
def test_silu_mul_cpu_equals_reference(rows):
    gate_up = torch.randn(rows, 2 * 101) * 8  # 101: a ragged tail after the 8-wide loop; large |gate| too
    torch.testing.assert_close(
        CPU.silu_and_mul(gate_up), REFERENCE.silu_and_mul(gate_up), rtol=1e-5, atol=1e-5
    )


def test_custom_ops_are_registered_under_ember_and_match_the_reference():
    x, w = torch.randn(3, 96), torch.randn(96)
    torch.testing.assert_close(torch.ops.ember.rms_norm(x, w, 1e-5), REFERENCE.rms_norm(x, w, 1e-5))
    qkv, cos, sin, slots, k, v, hq = _rope_inputs(3)
    k2, v2 = k.clone(), v.clone()
    want = REFERENCE.rope_write_kv(qkv, cos, sin, slots, k, v, hq)
    torch.testing.assert_close(torch.ops.ember.rope_write_kv(qkv, cos, sin, slots, k2, v2, hq), want)
    torch.testing.assert_close(k2, k)
    q, k, v, meta = _decode_inputs(7)
    want, got = torch.empty_like(q), torch.empty_like(q)
    REFERENCE.decode_attention(q, k, v, meta, 0.25, want)
    torch.ops.ember.decode_attention(
        q, k, v, meta.decode_block_tables, meta.decode_context_lens, 7, 0.25, got
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_block_linear_op_matches_the_reference(fmt, monkeypatch):
    if cpu_backend.unavailable_reason() is not None:
        monkeypatch.setenv("EMBER_CPU_KERNELS", "0")  # the op then computes with the reference
    weight = _block_weight(fmt)
    x = torch.randn(2, 96)
    want = REFERENCE.block_linear(fmt, *weight)(x)
    got = torch.ops.ember.block_linear(x, *weight, fmt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_custom_ops_have_fake_implementations_for_compile():
    x, w = torch.randn(3, 96), torch.randn(96)
    torch.library.opcheck(torch.ops.ember.rms_norm, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.ember.rope_write_kv, _rope_inputs(3))
    q, k, v, meta = _decode_inputs(None)
    args = (q, k, v, meta.decode_block_tables, meta.decode_context_lens, None, 0.25, torch.empty_like(q))
    torch.library.opcheck(torch.ops.ember.decode_attention, args)


def test_runner_allocates_the_backends_kv_layout(random_model_dirs):
    path = random_model_dirs["llama-gqa"]
    cfg = ModelConfig.from_dir(path)
    model = load_model(path, cfg, torch.float32, torch.device("cpu"))
    assert model.backend is select_backend("cpu", torch.float32)
    assert all(layer.self_attn.backend is model.backend for layer in model.layers)
    runner = ModelRunner(model, num_blocks=10, block_size=4, device=torch.device("cpu"))
    layout = model.backend.kv_cache_layout(cfg, 4, torch.float32)
    assert isinstance(layout, KVCacheLayout) and runner.kv_layout == layout
    assert len(runner.kv_caches) == cfg.num_hidden_layers
    assert all(k.shape == v.shape == layout.shape(10) for k, v in runner.kv_caches)
    per_block = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in runner.kv_caches)
    assert per_block == 10 * layout.bytes_per_block == 10 * ModelRunner.bytes_per_block(cfg, 4, torch.float32)
    runner.kv_caches[0][0][:, 3] = 1.5
    runner.copy_blocks([(3, 7)])
    assert bool((runner.kv_caches[0][0][:, 7] == 1.5).all())


def test_modules_take_their_ops_from_the_backend():
    norm = RMSNorm(8, 1e-5)
    assert norm.backend is REFERENCE and not norm.cpu_kernel
    norm.set_backend(CPU)
    assert norm.backend is CPU and norm.cpu_kernel
