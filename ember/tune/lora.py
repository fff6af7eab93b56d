"""Trainable LoRA on ember's fused projections, with PEFT's semantics, saved in PEFT's format.

A projection fusing HF sub-modules (q|k|v in qkv_proj, gate|up in gate_up_proj; ember.models.projections)
gets one A [r, in] and B [out_part, r] per targeted sub-module, as PEFT has them, so the saved adapter
is PEFT's. Each part adds `scaling * B @ A @ dropout(x)` to its output columns, with scaling
`lora_alpha / r` (`lora_alpha / sqrt(r)` under rsLoRA). A is initialised kaiming-uniform (a = sqrt(5)),
B zeros, as PEFT does; the base weights are frozen. Without dropout the parts' A matrices run as one
matmul (x read once), the saving that fusing the base projection made.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ember.models.projections import HF_MODULES, layer_projections

PEFT_KEY = "base_model.model.model.layers.{layer}.{group}.{module}.lora_{half}.weight"


@dataclass
class LoRASwitch:
    """Shared by every LoRA module of a model: off gives the bare base (DPO's reference model)."""

    enabled: bool = True


class LoRATrainLinear(nn.Module):
    def __init__(
        self,
        base: nn.Linear,
        parts: list[tuple[str, int, int]],  # (HF module, first output column, width), in order
        targets: set[str],
        r: int,
        scaling: float,
        dropout: float,
        switch: LoRASwitch,
    ):
        super().__init__()
        self.base = base
        self.parts = parts
        self.trained = [name for name, _, _ in parts if name in targets]
        self.r, self.scaling, self.switch = r, scaling, switch
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # float32 whatever the base's dtype: the optimizer updates full-precision weights, cast per use
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(r, base.in_features, **kw)) for name in self.trained}
        )
        self.lora_B = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(w, r, **kw)) for name, _, w in parts if name in targets}
        )

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for name in self.trained:  # PEFT: kaiming_uniform_(A, a=sqrt(5)); B = 0
                a = torch.empty(self.lora_A[name].shape)  # drawn on the host: the same values on any device
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                self.lora_A[name].copy_(a)
                self.lora_B[name].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        y = self.base(x)
        if not self.switch.enabled or not self.trained:
            return y
        if self.dropout is None:  # one matmul for every part's A: [T, n_parts * r]
            a = torch.cat([self.lora_A[n] for n in self.trained]) if len(self.trained) > 1 else None
            a = a if a is not None else self.lora_A[self.trained[0]]
            xa = x @ a.to(x.dtype).t()
        else:  # PEFT draws an independent dropout mask per sub-module
            xa = torch.cat([self.dropout(x) @ self.lora_A[n].to(x.dtype).t() for n in self.trained], dim=-1)
        # Every part's B as one block-diagonal [out, n_parts * r] (zero rows for parts not trained), so the
        # whole delta is one addmm into the base output: no per-part slices, concatenations or zero fills.
        blocks = [
            self.lora_B[name] if name in self.lora_B else self.lora_B[self.trained[0]].new_zeros(width, 0)
            for name, _, width in self.parts
        ]
        b = blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)
        return torch.addmm(y, xa, b.to(x.dtype).t(), alpha=self.scaling)


def add_lora(
    model: nn.Module,
    r: int,
    lora_alpha: float,
    target_modules: list[str],
    dropout: float = 0.0,
    use_rslora: bool = False,
    generator: torch.Generator | None = None,
) -> LoRASwitch:
    """Freeze `model` and wrap the projections holding any of `target_modules` (HF names) with LoRA."""
    unknown = sorted(set(target_modules) - set(HF_MODULES))
    if unknown:
        raise ValueError(f"target modules {unknown} are not LoRA-able; known: {', '.join(HF_MODULES)}")
    if r < 1:
        raise ValueError(f"r must be a positive integer (got {r})")
    targets = set(target_modules)
    scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
    switch = LoRASwitch()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    for layer in model.layers:
        for parent, proj in layer_projections(layer):
            parts = proj.part_slices(cfg)
            if not targets & {name for name, _, _ in parts}:
                continue
            module = LoRATrainLinear(getattr(parent, proj.name), parts, targets, r, scaling, dropout, switch)
            module.reset_parameters(generator)
            setattr(parent, proj.name, module)
    model.lora_switch = switch
    return switch


def lora_modules(model: nn.Module) -> list[tuple[int, str, LoRATrainLinear]]:
    """(layer index, group, module) of every LoRA module, in layer order."""
    out = []
    for i, layer in enumerate(model.layers):
        for parent, proj in layer_projections(layer):
            module = getattr(parent, proj.name)
            if isinstance(module, LoRATrainLinear):
                out.append((i, proj.group, module))
    return out


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's tensor names -> A [r, in] and B [out, r] of every trained sub-module."""
    out = {}
    for i, group, module in lora_modules(model):
        for name in module.trained:
            for half, table in (("A", module.lora_A), ("B", module.lora_B)):
                key = PEFT_KEY.format(layer=i, group=group, module=name, half=half)
                out[key] = table[name].detach().float().cpu().contiguous()
    return out


def save_adapter(
    model: nn.Module,
    path: str | Path,
    r: int,
    lora_alpha: float,
    target_modules: list[str],
    dropout: float,
    use_rslora: bool,
    base_model: str,
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors as PEFT's save_pretrained does."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "target_modules": [m for m in HF_MODULES if m in set(target_modules)],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    save_file(lora_state_dict(model), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
