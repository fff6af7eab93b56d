"""int4 weight-only quantization: the packed kernels against float math on the dequantized weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ember import LLM, SamplingParams
from ember.models.packed import unpack_model
from ember.models.quant import Int4Linear, Int8Linear, dequantize_int4, quantize_int4
from tests.helpers import assert_follows_along_common_greedy_path


def _q4_1_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Weights as a GGUF Q4_1 tensor holds them: per group of 32, min + scale * code, codes 0..15."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15  # the quantizer maps each group's min and max to 0 and 15
    scale = torch.rand(n, k // 32, 1, generator=g) * 0.1 + 0.01
    lo = torch.randn(n, k // 32, 1, generator=g) * 0.3
    return (lo + scale * codes).view(n, k)


def test_q4_1_weights_survive_the_round_trip_exactly():
    w = _q4_1_weight(96, 128)
    codes, sz = quantize_int4(w)
    assert codes.min() >= 0 and codes.max() <= 15
    torch.testing.assert_close(dequantize_int4(codes, sz), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_matches_float_math_on_the_dequantized_weight(m, bias):
    torch.manual_seed(m)
    lin = nn.Linear(160, 96, bias=bias)
    lin.weight.data = _q4_1_weight(96, 160, seed=m)
    x = torch.randn(m, 160)
    ref = lin(x)
    got = Int4Linear(lin)(x.bfloat16()).float()
    assert got.shape == (m, 96)
    # bfloat16 activations: about 3 significant digits.
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


def test_int8_linear_matches_float_math():
    torch.manual_seed(0)
    lin = nn.Linear(64, 300, bias=False)
    x = torch.randn(3, 64)
    got = Int8Linear(lin)(x.bfloat16()).float()
    ref = lin(x)
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


def test_int4_needs_bfloat16_on_cpu():
    with pytest.raises(ValueError, match="bfloat16"):
        LLM(model="unused", quantization="int4")
    with pytest.raises(ValueError, match="int4, int8 or none"):
        LLM(model="unused", dtype="bfloat16", quantization="int3")


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-bias"])
def test_quantized_engine_equals_float_engine_on_the_same_quantized_weights(random_model_dirs, kind):
    """The int4 engine computes what a bfloat16 engine does with the int4 grid as its float weights."""
    path = str(random_model_dirs[kind])
    quant = LLM(model=path, dtype="bfloat16", quantization="int4", kv_cache_memory="32MiB")
    ref = LLM(model=path, dtype="bfloat16", kv_cache_memory="32MiB")
    model = ref.engine.model
    # The loader quantizes from the checkpoint's fp32 weights, so the reference grid comes from them too.
    source = LLM(model=path, dtype="float32", kv_cache_memory="8MiB").engine.model

    def projections(m):
        for layer in m.layers:
            yield from (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj)
            yield layer.mlp.down_proj

    with torch.no_grad():
        for proj, src in zip(projections(model), projections(source), strict=True):
            proj.weight.copy_(dequantize_int4(*quantize_int4(src.weight)))
        # The int8 LM head, as Int8Linear rounds it.
        head = Int8Linear(source.lm_head)
        w = head.weight_int8.float() * head.scale.float()[:, None]
        if model.lm_head.weight is model.embed_tokens.weight:
            model.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        model.lm_head.weight.copy_(w)
    # Next-token distributions along the int4 engine's own greedy path (teacher forcing): both engines
    # compute in bfloat16, so they agree to rounding; greedy runs of a random model drift apart on ties.
    prompts = [[5, 17, 300 + i, 42, 7 * i + 1] * (i + 1) for i in range(4)]
    path_tokens = quant.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    prefixes = [
        p + o.outputs[0].token_ids[:j] for p, o in zip(prompts, path_tokens, strict=True) for j in range(6)
    ]
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    same_top, compared = 0, 0
    for a, b in zip(ref.generate(prefixes, params), quant.generate(prefixes, params), strict=True):
        want, got = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        same_top += a.outputs[0].token_ids == b.outputs[0].token_ids
        for t in set(want) & set(got):
            assert abs(want[t].logprob - got[t].logprob) < 0.15
            compared += 1
    assert same_top >= 0.9 * len(prefixes)
    assert compared >= 3 * len(prefixes)


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-bias"])
def test_int8_engine_equals_float_engine_on_the_same_int8_weights(random_model_dirs, kind):
    """int8 in a float32 model: decode steps round activations to bfloat16 for the packed kernel, prefill
    runs the dense fp32 copy; both agree with fp32 math on the int8 grid."""
    path = str(random_model_dirs[kind])
    quant = LLM(model=path, quantization="int8", kv_cache_memory="32MiB")
    ref = LLM(model=path, kv_cache_memory="32MiB")
    model = ref.engine.model
    unpack_model(model)  # dense nn.Linear weights, to overwrite
    with torch.no_grad():
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                q = Int8Linear(proj)
                proj.weight.copy_(q.weight_int8.float() * q.scale.float()[:, None])
        q = Int8Linear(model.lm_head)
        w = q.weight_int8.float() * q.scale.float()[:, None]
        if model.lm_head.weight is model.embed_tokens.weight:
            model.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False)
        model.lm_head.weight.copy_(w)
    assert isinstance(quant.engine.model.layers[0].mlp.down_proj, Int8Linear)
    # Along each run's common greedy prefix, the next-token distributions agree to bf16 rounding.
    assert_follows_along_common_greedy_path(ref, quant)


@pytest.mark.slow
def test_quantized_default_model_keeps_its_predictions(default_model_dir, default_llm):
    """On the real model, int4 (which reads the GGUF's own Q4_1 grid) ranks the fp32 model's choice high."""
    quant = LLM(model=str(default_model_dir), dtype="bfloat16", quantization="int4", kv_cache_memory="64MiB")
    questions = ["What is the capital of France?", "Name a primary colour.", "How many legs has a spider?"]
    chats = [[{"role": "user", "content": q}] for q in questions]
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    for a, b in zip(default_llm.chat(chats, params), quant.chat(chats, params), strict=True):
        ref, got = a.outputs[0], b.outputs[0]
        assert ref.token_ids[0] in got.logprobs[0]  # fp32's pick is in int4's top 5
        shared = set(ref.logprobs[0]) & set(got.logprobs[0])
        assert len(shared) >= 3
        for t in shared:
            assert abs(ref.logprobs[0][t].logprob - got.logprobs[0][t].logprob) < 0.5
