"""The projection table is the one source of the fused layout: the loader's fused weights, LoRA's slices
and adapter validation's shapes all agree with the HF checkpoint of a small random model."""

from __future__ import annotations

import pytest
import torch

from ember.lora.adapter import MODULES, module_shapes
from ember.models.config import ModelConfig
from ember.models.loader import load_model
from ember.models.lora import enable_lora
from ember.models.packed import unpack_model
from ember.models.projections import PROJECTIONS, hf_shapes
from ember.models.weights import load_state_dict


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-bias"])
def test_loader_lora_and_adapter_validation_agree_on_the_table(random_model_dirs, kind):
    path = random_model_dirs[kind]
    cfg = ModelConfig.from_dir(path)
    hf = load_state_dict(path)
    prefix = "model.layers.1."
    # Adapter validation: PEFT shapes are the HF modules' (out, in).
    shapes = module_shapes(cfg)
    assert shapes == hf_shapes(cfg)
    assert set(MODULES) == set(shapes)
    for module, (out, inp) in shapes.items():
        group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        assert tuple(hf[f"{prefix}{group}.{module}.weight"].shape) == (out, inp)
    # Loader: each fused weight is its HF parts, stacked in the table's order.
    model = load_model(path, cfg, torch.float32, torch.device("cpu"))
    unpack_model(model)
    layer = model.layers[1]
    for p in PROJECTIONS:
        fused = layer.get_submodule(f"{p.group}.{p.name}")
        assert (fused.out_features, fused.in_features) == (p.out_features(cfg), p.in_features(cfg))
        for module, start, rows in p.part_slices(cfg):
            want = hf[f"{prefix}{p.group}.{module}.weight"]
            torch.testing.assert_close(fused.weight[start : start + rows], want, rtol=0, atol=0)
            if p.has_bias(cfg):
                torch.testing.assert_close(
                    fused.bias[start : start + rows], hf[f"{prefix}{p.group}.{module}.bias"]
                )
    assert (cfg.attention_bias and kind == "qwen2-bias") or not cfg.attention_bias
    # LoRA: one slot buffer per HF part, sized as adapter validation expects.
    enable_lora(model, num_slots=2, max_rank=4)
    for p in PROJECTIONS:
        wrapped = model.layers[1].get_submodule(f"{p.group}.{p.name}")
        assert wrapped.parts == p.part_slices(cfg)
        for module, _, rows in wrapped.parts:
            out, inp = shapes[module]
            assert getattr(wrapped, f"A_{module}").shape == (2, 4, inp)
            assert getattr(wrapped, f"B_{module}").shape == (2, out, 4)
            assert rows == out
