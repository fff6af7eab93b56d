"""LoRA deltas applied per token, by adapter slot, in one forward pass: the plain-PyTorch reference path.

Each LoRA-able projection is wrapped in a LoRALinear holding, for each sub-module it fuses (q, k and v in
qkv_proj; gate and up in gate_up_proj, as ember.models.projections lays them out), the A and B of every adapter slot, stacked: A [slots, r_max, in],
B [slots, out, r_max] (zero-padded to the maximum rank, scaling folded into B). A step's tokens carry a
slot id each; the rows of one slot form a segment, and each segment adds `(x @ A.T) @ B.T` to its rows of
the projection's output slice. Tokens with no adapter get nothing added, so the bare base model and any
mix of adapters share a batch. A backend with a LoRA kernel (the CUDA backend's segmented gather matmul,
ember.kernels.triton.lora) replaces the segment loop with two launches per sub-module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from ember.models.projections import layer_projections


@dataclass
class LoRABatch:
    """The step's tokens grouped by adapter slot: (slot, row indices) for every slot with tokens."""

    segments: list[tuple[int, torch.Tensor]]

    @cached_property
    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [N], seg_starts [G + 1], seg_slots [G]): the segments as the LoRA kernel takes them;
        built once per step, read by every projection."""
        rows = torch.cat([r for _, r in self.segments])
        lens = [len(r) for _, r in self.segments]
        starts = torch.tensor([0, *lens]).cumsum(0).to(rows.device)
        slots = torch.tensor([s for s, _ in self.segments]).to(rows.device)
        return rows, starts, slots


@dataclass
class LoRAContext:
    """Shared by every LoRALinear of a model: the model runner sets `batch` before each forward."""

    num_slots: int
    max_rank: int
    batch: LoRABatch | None = None
    # slot -> the sub-module names that slot's adapter has weights for (others add nothing)
    present: list[set[str]] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)  # slot -> its adapter's rank (the rest is padding)
    kernel: Callable[..., None] | None = None  # the backend's lora_delta; None: the loop below


class LoRALinear(nn.Module):
    def __init__(
        self, base: nn.Module, parts: list[tuple[str, int, int]], in_features: int, ctx: LoRAContext
    ):
        """parts: (module name, first output column, width) of each sub-module fused in `base`."""
        super().__init__()
        self.base = base
        self.parts = parts
        self.ctx = ctx
        for name, _, width in parts:
            self.register_buffer(f"A_{name}", torch.zeros(ctx.num_slots, ctx.max_rank, in_features))
            self.register_buffer(f"B_{name}", torch.zeros(ctx.num_slots, width, ctx.max_rank))

    def set_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Load (A [r, in], B [out, r]) per sub-module into a slot; sub-modules not given get zeros."""
        for name, _, _ in self.parts:
            a_all, b_all = getattr(self, f"A_{name}"), getattr(self, f"B_{name}")
            a_all[slot].zero_()
            b_all[slot].zero_()
            if name in weights:
                a, b = weights[name]
                a_all[slot, : a.shape[0]] = a.to(a_all.dtype)
                b_all[slot, :, : b.shape[1]] = b.to(b_all.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.ctx.batch
        if batch is None:
            return y
        if self.ctx.kernel is not None:
            rows, starts, slots = batch.packed
            for name, start, width in self.parts:
                a, b = getattr(self, f"A_{name}"), getattr(self, f"B_{name}")
                self.ctx.kernel(x, y[:, start : start + width], a, b, rows, starts, slots)
            return y
        for slot, rows in batch.segments:
            present, r = self.ctx.present[slot], self.ctx.ranks[slot]
            xs = x.index_select(0, rows)
            for name, start, width in self.parts:
                if name not in present:
                    continue
                a, b = getattr(self, f"A_{name}")[slot, :r], getattr(self, f"B_{name}")[slot, :, :r]
                delta = (xs @ a.t()) @ b.t()
                y[:, start : start + width].index_add_(0, rows, delta.to(y.dtype))
        return y


def enable_lora(model: nn.Module, num_slots: int, max_rank: int) -> LoRAContext:
    """Wrap every LoRA-able projection of a Llama-family model; returns the context the runner drives."""
    cfg = model.config
    ctx = LoRAContext(
        num_slots,
        max_rank,
        present=[set() for _ in range(num_slots)],
        ranks=[0] * num_slots,
        kernel=getattr(model, "backend", None) and model.backend.lora_delta,
    )
    dtype = model.embed_tokens.weight.dtype
    device = model.embed_tokens.weight.device
    for layer in model.layers:
        for parent, p in layer_projections(layer):
            proj = LoRALinear(getattr(parent, p.name), p.part_slices(cfg), p.in_features(cfg), ctx)
            for name, buf in list(proj.named_buffers(recurse=False)):
                setattr(proj, name, buf.to(device=device, dtype=dtype))
            setattr(parent, p.name, proj)
    model.lora = ctx
    return ctx


def load_slot(
    model: nn.Module, slot: int, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Put an adapter's weights ((layer, module) -> (A, B)) into a slot of every wrapped projection."""
    by_layer: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (layer, module), ab in weights.items():
        by_layer.setdefault(layer, {})[module] = ab
    with torch.no_grad():
        for index, layer in enumerate(model.layers):
            mine = by_layer.get(index, {})
            for parent, p in layer_projections(layer):
                getattr(parent, p.name).set_slot(slot, mine)
    model.lora.present[slot] = {module for _, module in weights}
    model.lora.ranks[slot] = max((a.shape[0] for a, _ in weights.values()), default=0)
