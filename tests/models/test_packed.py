"""oneDNN-packed projections compute what nn.Linear does, to float32 rounding, at every row count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ember import LLM
from ember.models.packed import PackedLinear, packing_available, unpack_model

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_nn_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(linear)
    assert torch.equal(packed.weight, linear.weight)
    for rows in (1, 2, 5, 9, 64):
        x = torch.randn(rows, 96)
        want = linear(x)
        assert torch.allclose(packed(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(packed.unpacked().weight, linear.weight)


def test_float32_cpu_models_are_packed_and_unpack_back(random_model_dirs):
    llm = LLM(model=str(random_model_dirs["qwen2-bias"]), num_blocks=8)  # q/k/v biases, tied LM head
    model = llm.engine.model
    assert isinstance(model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(model.lm_head, PackedLinear)
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight)  # the table stays for lookups
    unpack_model(model)
    assert type(model.layers[0].mlp.down_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    bf16 = LLM(model=str(random_model_dirs["qwen2-bias"]), num_blocks=8, dtype="bfloat16").engine.model
    assert type(bf16.layers[0].mlp.down_proj) is nn.Linear  # float32 only
