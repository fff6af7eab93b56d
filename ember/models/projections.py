"""The one table of fused projections: which HF weights feed which of ember's projections, in what order.

ember fuses q|k|v into `qkv_proj` and gate|up into `gate_up_proj` (one matmul each). The weight loader
(concatenating HF tensors), quantization and packing (swapping projections), LoRA (one delta per fused
part, at its output columns) and adapter validation (PEFT's per-module shapes) all read this table, so the
layout is written down once. Sizes are ModelConfig attribute names, so the table stays plain data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ember.models.config import ModelConfig


@dataclass(frozen=True)
class Projection:
    group: str  # the decoder layer's sub-module holding it: "self_attn" or "mlp"
    name: str  # ember's module, e.g. "qkv_proj"
    in_size: str  # ModelConfig attribute: the input width
    parts: tuple[tuple[str, str], ...]  # (HF module, ModelConfig attribute of its output rows), in order
    bias: str | None = None  # ModelConfig flag saying whether the HF parts carry biases

    def part_slices(self, cfg: ModelConfig) -> list[tuple[str, int, int]]:
        """(HF module, first output row, rows) of each part in the fused weight [sum(rows), in]."""
        out, start = [], 0
        for module, size in self.parts:
            rows = getattr(cfg, size)
            out.append((module, start, rows))
            start += rows
        return out

    def in_features(self, cfg: ModelConfig) -> int:
        return getattr(cfg, self.in_size)

    def out_features(self, cfg: ModelConfig) -> int:
        return sum(getattr(cfg, size) for _, size in self.parts)

    def has_bias(self, cfg: ModelConfig) -> bool:
        return self.bias is not None and bool(getattr(cfg, self.bias))

    def linear(self, cfg: ModelConfig) -> nn.Linear:
        """The fused nn.Linear the model builds: weight [out_features, in_features]."""
        return nn.Linear(self.in_features(cfg), self.out_features(cfg), bias=self.has_bias(cfg))


# Per decoder layer; Qwen2's biases sit on q, k and v only.
PROJECTIONS: tuple[Projection, ...] = (
    Projection(
        "self_attn",
        "qkv_proj",
        "hidden_size",
        (("q_proj", "q_size"), ("k_proj", "kv_size"), ("v_proj", "kv_size")),
        bias="attention_bias",
    ),
    Projection("self_attn", "o_proj", "q_size", (("o_proj", "hidden_size"),)),
    Projection(
        "mlp",
        "gate_up_proj",
        "hidden_size",
        (("gate_proj", "intermediate_size"), ("up_proj", "intermediate_size")),
    ),
    Projection("mlp", "down_proj", "intermediate_size", (("down_proj", "hidden_size"),)),
)
BY_NAME = {p.name: p for p in PROJECTIONS}
# HF module -> (group, fused projection it lands in)
HF_MODULES: dict[str, tuple[str, str]] = {m: (p.group, p.name) for p in PROJECTIONS for m, _ in p.parts}


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each HF module (q_proj, ..., down_proj): the shapes PEFT adapters are saved with."""
    return {module: (rows, p.in_features(cfg)) for p in PROJECTIONS for module, _, rows in p.part_slices(cfg)}


def layer_projections(layer: nn.Module) -> list[tuple[nn.Module, Projection]]:
    """(parent module, table entry) of each projection of one decoder layer."""
    return [(layer.get_submodule(p.group), p) for p in PROJECTIONS]


def swap_projections(
    model: nn.Module,
    make: Callable[[nn.Module], nn.Module],
    make_head: Callable[[nn.Module], nn.Module] | None = None,
) -> None:
    """Replace, in place, every decoder layer's projections with make(projection) and the LM head with
    make_head(lm_head) (make, when not given): how quantization and the CPU packing install themselves."""
    for layer in model.layers:
        for parent, p in layer_projections(layer):
            setattr(parent, p.name, make(getattr(parent, p.name)))
    model.lm_head = (make_head or make)(model.lm_head)
