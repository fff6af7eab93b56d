"""ember's C kernels for the CPU against the PyTorch code they replace (the reference)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ember import LLM, SamplingParams
from ember.backends import CPU
from ember.kernels import cpu
from ember.models.attention import AttentionMetadata, decode_reference, write_kv
from ember.models.llama import RMSNorm
from ember.models.packed import unpack_model
from ember.models.quant import (
    BlockQuantLinear,
    dequantize_q4_1,
    dequantize_q8_0,
    quantize_q4_1,
    quantize_q8_0,
)
from ember.models.rope import apply_rotary
from tests.helpers import assert_follows_along_common_greedy_path

# Where the kernels cannot run (no AVX2 or no C compiler) the PyTorch path serves float32 models and
# q4_1/q8_0 are refused; EMBER_REQUIRE_CPU_KERNELS=1 turns that skip into a failure (CI sets nothing).
needs_kernels = pytest.mark.skipif(
    not cpu.available() and os.environ.get("EMBER_REQUIRE_CPU_KERNELS") != "1",
    reason=f"{cpu.unavailable_reason()}",
)


def _gguf_q4_1(n: int, k: int, seed: int) -> torch.Tensor:
    """Weights as a Q4_1 GGUF holds them: fp16 d and m per block of 32, codes 0..15 with 0 and 15 used."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    codes[..., 3], codes[..., 20] = 0, 15
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.05 + 0.005).half().float()
    m = (torch.randn(n, k // 32, 1, generator=g) * 0.2).half().float()
    return (codes * d + m).view(n, k)


def _gguf_q8_0(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k // 32, 32), generator=g).float()
    codes[..., 5] = 127
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    return (codes * d).view(n, k)


def test_gguf_blocks_survive_the_round_trip_exactly():
    w = _gguf_q4_1(40, 96, seed=1)
    torch.testing.assert_close(dequantize_q4_1(*quantize_q4_1(w)), w, rtol=0, atol=0)
    w = _gguf_q8_0(40, 96, seed=2)
    torch.testing.assert_close(dequantize_q8_0(*quantize_q8_0(w)), w, rtol=0, atol=0)


def _quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: per block of 32, d = max|x| / 127 and codes round(x * (1 / d))."""
    b = x.view(x.shape[0], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(b * inv).clamp(-127, 127) * d).view_as(x)


@needs_kernels
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 33])
@pytest.mark.parametrize("n", [4, 7, 96])
def test_block_linear_is_exact_integer_math_on_the_quantized_operands(fmt, m, n):
    torch.manual_seed(m * 100 + n)
    k = 160
    lin = nn.Linear(k, n, bias=n != 4)
    lin.weight.data = (_gguf_q4_1 if fmt == "q4_1" else _gguf_q8_0)(n, k, seed=n)
    q = BlockQuantLinear(lin, fmt)
    torch.testing.assert_close(q.weight, lin.weight.data, rtol=0, atol=0)
    x = torch.randn(m, k) * torch.rand(m, 1) * 3
    got = q(x)
    # The same products in float64: the kernel's sums are exact integers, scaled once per block.
    ref = (
        _quantized_activations(x).double() @ lin.weight.double().t() + (0 if lin.bias is None else lin.bias)
    ).float()
    assert got.shape == (m, n)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # And close to the float product: 8-bit activations cost well under a percent.
    exact = F.linear(x, lin.weight, lin.bias)
    assert (got - exact).abs().max() <= 0.02 * exact.abs().max()


def test_block_formats_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="float32 activations"):
        LLM(model="unused", dtype="bfloat16", quantization="q4_1")
    with pytest.raises(ValueError, match="q4_1, q8_0, int4, int8 or none"):
        LLM(model="unused", quantization="q5_k")


@needs_kernels
def test_block_linear_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="multiple of 32"):
        BlockQuantLinear(nn.Linear(40, 8), "q4_1")
    q = BlockQuantLinear(nn.Linear(64, 8), "q8_0")
    with pytest.raises(TypeError, match="float32"):
        q(torch.randn(2, 64).bfloat16())
    with pytest.raises(ValueError, match=r"\[rows, 64\]"):
        q(torch.randn(2, 32))
    with pytest.raises(ValueError, match="float32"):
        cpu.rms_norm(torch.randn(2, 8).double(), torch.ones(8), 1e-5)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_rms_norm_kernel(rows):
    torch.manual_seed(rows)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96)
    x = torch.randn(rows, 96) * 4
    want = norm(x)
    norm.set_backend(CPU)
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-5)


def _cache(hkv: int, blocks: int, bs: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(hkv, blocks, bs, d), torch.randn(hkv, blocks, bs, d)


@needs_kernels
@pytest.mark.parametrize("t", [1, 3, 20])
def test_rope_and_cache_write_kernel(t):
    torch.manual_seed(t)
    hq, hkv, d, bs, blocks = 4, 2, 16, 4, 12
    qkv = torch.randn(t, (hq + 2 * hkv) * d)
    angles = torch.rand(t, d // 2) * 10
    cos = torch.cat([angles.cos()] * 2, -1)
    sin = torch.cat([angles.sin()] * 2, -1)
    slots = torch.randperm(blocks * bs)[:t]
    k_ref, v_ref = _cache(hkv, blocks, bs, d)
    k_got, v_got = k_ref.clone(), v_ref.clone()
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = apply_rotary((cos[:, None], sin[:, None]), q.reshape(t, hq, d), k.reshape(t, hkv, d))
    write_kv(k_ref, v_ref, k, v.reshape(t, hkv, d), slots)
    q_got = cpu.rope_write_kv(qkv, cos, sin, slots, k_got, v_got, hq)
    torch.testing.assert_close(q_got, q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_got, k_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_got, v_ref, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("group", [1, 3])
def test_decode_attention_kernel(window, group):
    torch.manual_seed(group)
    hkv, d, bs, blocks = 2, 16, 4, 40
    hq = hkv * group
    k_cache, v_cache = _cache(hkv, blocks, bs, d)
    lens = [1, 9, 30, 17]
    order = torch.randperm(blocks).tolist()  # scattered blocks, as a pool hands them out
    tables, at = [], 0
    for n in lens:
        nb = -(-n // bs)
        tables.append(order[at : at + nb])
        at += nb
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(lens), dtype=torch.long),
        num_decode_tokens=len(lens),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        decode_context_lens=torch.tensor(lens),
        prefills=[],
        block_size=bs,
        sliding_window=window,
        max_decode_len=max(lens),
    )
    q = torch.randn(len(lens), hq, d)
    want = decode_reference(q, k_cache, v_cache, meta, 0.25)
    got = torch.empty_like(q)
    cpu.decode_attention(
        q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, window, 0.25, got
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-bias", "mistral-window"])
def test_engine_with_kernels_equals_the_pytorch_path(random_model_dirs, kind, monkeypatch):
    """Whole engine, decode and chunked prefill, prefix-cache hits: the kernels change nothing but speed."""
    path = str(random_model_dirs[kind])
    prompts = [[5, 17, 300 + i, 42, 7 * i + 1] * (4 * i + 2) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    runs = {}
    for on in ("1", "0"):
        monkeypatch.setenv("EMBER_CPU_KERNELS", on)
        llm = LLM(model=path, kv_cache_memory="16MiB", block_size=4, max_num_batched_tokens=32)
        assert llm.engine.model.layers[0].self_attn.cpu_kernels == (on == "1")
        runs[on] = llm.generate(prompts + prompts[:2], params)
    for a, b in zip(runs["1"], runs["0"], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            for t in x:
                assert abs(x[t].logprob - y[t].logprob) < 1e-3


@needs_kernels
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_block_quantized_engine_follows_the_float_engine(random_model_dirs, fmt):
    """q4_1 and q8_0 on a random model: next-token distributions close to fp32 on the same block weights."""
    path = str(random_model_dirs["llama-gqa"])
    quant = LLM(model=path, quantization=fmt, kv_cache_memory="16MiB")
    assert isinstance(quant.engine.model.layers[0].mlp.down_proj, BlockQuantLinear)
    ref = LLM(model=path, kv_cache_memory="16MiB")
    model = ref.engine.model
    unpack_model(model)
    with torch.no_grad():
        for mine, theirs in zip(quant.engine.model.layers, model.layers, strict=True):
            for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
                theirs.get_submodule(name).weight.copy_(mine.get_submodule(name).weight)
        w = quant.engine.model.lm_head.weight
        model.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False)
        model.lm_head.weight.copy_(w)
    assert_follows_along_common_greedy_path(ref, quant)


@needs_kernels
@pytest.mark.slow
def test_q4_1_default_model_reads_the_gguf_grid_and_keeps_its_predictions(default_model_dir, default_llm):
    """The default model is a Q4_1 GGUF: q4_1 computes with exactly its weights (the LM head is Q8_0 in the
    file, and q8_0 here), and ranks the fp32 engine's choices at the top (its 8-bit activations move logprobs by a little)."""
    quant = LLM(model=str(default_model_dir), quantization="q4_1", kv_cache_memory="64MiB")
    fp32 = default_llm.engine.model
    for mine, theirs in zip(quant.engine.model.layers[:4], fp32.layers[:4], strict=True):
        for name in ("self_attn.qkv_proj", "mlp.down_proj"):
            torch.testing.assert_close(
                mine.get_submodule(name).weight, theirs.get_submodule(name).weight, rtol=0, atol=0
            )
    torch.testing.assert_close(quant.engine.model.lm_head.weight, fp32.lm_head.weight, rtol=0, atol=0)
    questions = ["What is the capital of France?", "Name a primary colour.", "How many legs has a spider?"]
    chats = [[{"role": "user", "content": q}] for q in questions]
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    for a, b in zip(default_llm.chat(chats, params), quant.chat(chats, params), strict=True):
        ref, got = a.outputs[0], b.outputs[0]
        assert ref.token_ids[0] in got.logprobs[0]  # fp32's pick is in q4_1's top 5
        shared = set(ref.logprobs[0]) & set(got.logprobs[0])
        assert len(shared) >= 3
        for t in shared:
            assert abs(ref.logprobs[0][t].logprob - got.logprobs[0][t].logprob) < 0.3, (
                t,
                ref.logprobs[0],
                got.logprobs[0],
            )
