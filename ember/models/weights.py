"""Read a checkpoint's tensors, by their HF names, from the safetensors files of an HF-layout directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# Checkpoint formats that unpickle on load: reading one can run arbitrary code, so they are refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of `model_dir`, one or many (sharded), in a stable order."""
    model_dir = Path(model_dir)
    index = model_dir / SHARD_INDEX
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(
                f"{index} lists shards that are not in {model_dir}: {', '.join(missing)}; "
                "re-download the model (an interrupted download leaves some shards out)"
            )
        return files
    if (model_dir / SINGLE_FILE).exists():
        return [model_dir / SINGLE_FILE]
    pickles = (
        sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if model_dir.is_dir()
        else []
    )
    if pickles:
        raise ValueError(
            f"{model_dir} holds only pickle checkpoints ({', '.join(pickles)}); ember reads safetensors only, "
            "because loading a pickle can run arbitrary code. Use the repo's safetensors files, or convert once "
            "with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)"
        )
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {SHARD_INDEX} in {model_dir}; pass an HF-layout model directory "
        "(config.json + safetensors weights) or a .gguf file"
    )


def load_state_dict(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in `model_dir`, floating ones cast to `dtype`, keyed by HF name.

    `lm_head.weight` is absent when the config ties it to `model.embed_tokens.weight`.
    """
    state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(Path(model_dir)):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping: it has keys() but no __iter__
                # Old Llama checkpoints carry rotary inverse frequencies as a buffer; they follow from the
                # config, and a stale copy would silently override rope scaling.
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                tensor = f.get_tensor(name)
                state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state
