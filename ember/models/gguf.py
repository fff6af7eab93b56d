"""Convert a llama.cpp GGUF file (llama or qwen2 architecture) into a cached HF-layout model directory.

The directory holds what an HF checkpoint holds -- config.json, generation_config.json, model.safetensors
(fp32, dequantized) and the tokenizer with its chat template -- so one loader serves both sources, and a
second start reads safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ember.paths import ember_cache_dir

logger = logging.getLogger(__name__)

# GGUF `general.architecture` -> HF `architectures` entry.
SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Part of the cache key: bump it when the output changes, so directories written by older code are not reused.
FORMAT_VERSION = 1

GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {  # `blk.N.<gguf>` -> `model.layers.N.<hf>`
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp stores Llama-3 rope scaling as a tensor of per-frequency divisors; in HF it is config.
ROPE_FREQS = "rope_freqs.weight"
# Tokens llama.cpp treats as end-of-generation by their text, beyond the ids the metadata declares
# (e.g. Qwen2.5's <|endoftext|> next to its eos <|im_end|>; Llama 3's <|eom_id|> next to <|eot_id|>).
EOG_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>")


def converted_dir(gguf_path: str | Path) -> Path:
    """Where the conversion of `gguf_path` lives, keyed by the file's identity: a replaced file converts anew."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{FORMAT_VERSION}"
    return ember_cache_dir() / "converted" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def convert_gguf(gguf_path: str | Path) -> Path:
    """The HF-layout directory converted from `gguf_path`, converting on the first call only."""
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    out = converted_dir(path)
    if out.is_dir():  # complete: a directory only appears under its final name by rename
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        logger.info("converting %s into %s (once; later starts reuse it)", path, out)
        write_hf_dir(path, tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not out.is_dir():
                raise
            # Another process finished the same conversion first; its result is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_hf_dir(gguf_path: Path, out_dir: Path) -> None:
    """Write config, generation config, fp32 safetensors and tokenizer for `gguf_path` into `out_dir`."""
    reader = GGUFReader(gguf_path)
    config = hf_config(reader)
    save_file(hf_state_dict(reader, config), out_dir / "model.safetensors", metadata={"format": "pt"})
    tokenizer = _save_tokenizer(gguf_path, out_dir, reader, config)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": _eos_ids(reader, config, tokenizer)}
    if config["pad_token_id"] is not None:
        generation["pad_token_id"] = config["pad_token_id"]
    source = {"gguf": str(Path(gguf_path).resolve()), "format_version": FORMAT_VERSION}
    for name, content in [("config", config), ("generation_config", generation), ("ember_source", source)]:
        (out_dir / f"{name}.json").write_text(json.dumps(content, indent=2) + "\n")


def hf_config(reader: GGUFReader) -> dict[str, Any]:
    """The HF LlamaConfig / Qwen2Config dict that the GGUF's metadata describes."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"GGUF architecture '{arch}' is not supported; supported: {', '.join(SUPPORTED_ARCHS)}. "
            "Use a GGUF of a Llama- or Qwen2-family model, or its HF safetensors repo"
        )

    def required(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(
                f"GGUF metadata has no '{arch}.{key}'; the file is truncated or not a {arch} model"
            )
        return value

    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError(
            "GGUF has no token_embd.weight tensor; the file is truncated or not a language model"
        )
    heads = required("attention.head_count")
    hidden = required("embedding_length")
    # ggml lists dimensions innermost first: token_embd is [hidden, vocab]. The rows are the vocab the weights
    # have, which is what the model needs even where the token list is padded or short.
    vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1])
    head_dim = (
        _field(reader, f"{arch}.attention.key_length")
        or (_field(reader, f"{arch}.rope.dimension_count") if arch == "llama" else None)
        or hidden // heads
    )
    rope_theta = _f32_decimal(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHS[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": heads,
        # llama.cpp omits head_count_kv for models without grouped-query attention.
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv") or heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32_decimal(required("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(reader, arch, head_dim, rope_theta),
        "max_position_embeddings": required("context_length"),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    else:  # Qwen2's GGUF has no sliding-window key; its released models run full attention
        config["use_sliding_window"] = False
    return config


def hf_state_dict(reader: GGUFReader, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every weight of the GGUF, dequantized to fp32, keyed by HF name; matrices are [out, in]."""
    arch = config["model_type"]
    state: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="converting GGUF tensors", unit="tensor"):
        if tensor.name == ROPE_FREQS:
            continue
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise ValueError(
                f"GGUF tensor '{tensor.name}' has no counterpart in an HF {arch} model; "
                "ember converts dense (non-mixture-of-experts) llama and qwen2 GGUFs only"
            )
        # ggml lists dimensions innermost first, so reversing them gives HF's [out, in].
        weight = dequantize(tensor.data, tensor.tensor_type).reshape([int(d) for d in reversed(tensor.shape)])
        if arch == "llama" and ".attn_q." in tensor.name:
            weight = unpermute_qk(weight, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in tensor.name:
            weight = unpermute_qk(weight, config["num_key_value_heads"])
        # A copy: an F32 tensor is a view into the memory-mapped file.
        state[name] = torch.from_numpy(np.array(weight, dtype=np.float32))
    return state


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.bias` -> `model.layers.3.self_attn.q_proj.bias`; None for a tensor HF has no place for."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{suffix}"
    return None


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of the rows of a Llama Q or K projection (weight or bias).

    HF's rope rotates dim j of a head with dim j + d/2 (`rotate_half`); ggml's normal-mode rope rotates
    adjacent dims 2j and 2j+1. So llama.cpp's converter interleaves each head's two halves,
        rows (head, half, j) -> (head, j, half):  w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)
    and this reads the rows back as (n_head, d/2, 2) and swaps again. K is grouped by the KV head count.
    Identical to transformers' `LlamaTensorProcessor._reverse_permute_weights`. Qwen2 uses NEOX-mode rope,
    which rotates halves like HF, so its rows are stored unpermuted.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def llama3_rope_factors(scaling: dict[str, Any], freqs: np.ndarray) -> np.ndarray:
    """The divisor llama.cpp applies to each rope frequency under Llama 3 scaling.  # [head_dim // 2]"""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / freqs.astype(np.float64)
    smooth = (context / wavelength - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < context / high, 1.0, np.where(wavelength > context / low, factor, between))


def llama3_rope_scaling(rope_freqs: np.ndarray, head_dim: int, rope_theta: float) -> dict[str, Any] | None:
    """Recover HF's llama3 `rope_scaling` from the per-frequency divisors in `rope_freqs.weight`.

    Between the two plateaus (1 for short wavelengths, `factor` for long ones) the converter writes
    1 / ((1 - s)/factor + s) with s = (L/wavelength - low)/(high - low) and wavelength = 2*pi/f, so s is a
    line in f: s = a*f - b, a = L / (2*pi*(high - low)), b = low / (high - low). A line fixes two of the
    three unknowns (L, low, high); low_freq_factor is taken as 1, as in every Llama 3.x release, and the
    answer is accepted only if it reproduces the stored divisors.
    """
    stored = rope_freqs.astype(np.float64).reshape(-1)
    if stored.shape[0] != head_dim // 2:
        raise ValueError(f"{ROPE_FREQS} has {stored.shape[0]} entries; expected head_dim/2 = {head_dim // 2}")
    factor = _f32_decimal(stored.max())
    if factor <= 1.0:
        return None
    # float32, as llama.cpp's converter computes them.
    freqs = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    candidates = [
        (4.0, 8192)
    ]  # Llama 3.1-3.3's values, for a file with too few in-between frequencies to fit
    between = (stored > 1 + 1e-6) & (stored < factor * (1 - 1e-6))
    if between.sum() >= 2:
        s = (1 / stored[between] - 1 / factor) / (1 - 1 / factor)
        a, minus_b = np.polyfit(freqs[between].astype(np.float64), s, 1)
        if minus_b < 0:
            high = 1.0 - 1.0 / minus_b
            candidates.insert(0, (round(high, 3), round(a * 2 * math.pi * (high - 1.0))))
    for high, context in candidates:
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": high,
            "original_max_position_embeddings": context,
        }
        if np.allclose(llama3_rope_factors(scaling, freqs), stored, rtol=1e-4):
            return scaling
    raise ValueError(
        f"{ROPE_FREQS} does not follow Llama 3 rope scaling with low_freq_factor 1; ember cannot express it "
        "as an HF rope_scaling. Use the model's HF safetensors repo instead"
    )


def _rope_scaling(reader: GGUFReader, arch: str, head_dim: int, rope_theta: float) -> dict[str, Any] | None:
    rope_freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if rope_freqs is not None:
        return llama3_rope_scaling(dequantize(rope_freqs.data, rope_freqs.tensor_type), head_dim, rope_theta)
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32_decimal(factor)}
    if kind == "yarn":
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        return {
            "rope_type": "yarn",
            "factor": _f32_decimal(factor),
            "original_max_position_embeddings": original,
        }
    raise ValueError(f"GGUF rope scaling type '{kind}' is not supported; supported: linear, yarn, llama3")


def _save_tokenizer(gguf_path: Path, out_dir: Path, reader: GGUFReader, config: dict[str, Any]) -> Any:
    # Imported here: transformers takes seconds to import, and a cache hit needs none of it.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    template = _field(reader, "tokenizer.chat_template")
    if tokenizer.chat_template is None and template is not None:
        tokenizer.chat_template = template
    if tokenizer.bos_token is None and config["bos_token_id"] is not None:
        tokenizer.bos_token = tokenizer.convert_ids_to_tokens(config["bos_token_id"])
    if tokenizer.eos_token is None and config["eos_token_id"] is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config["eos_token_id"])
    tokenizer.model_max_length = config["max_position_embeddings"]
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _eos_ids(reader: GGUFReader, config: dict[str, Any], tokenizer: Any) -> list[int]:
    """Every token that ends generation: the ids the metadata declares, then those llama.cpp knows by text."""
    declared = [
        config["eos_token_id"],
        _field(reader, "tokenizer.ggml.eot_token_id"),
        _field(reader, "tokenizer.ggml.eom_token_id"),
    ]
    added = tokenizer.get_added_vocab()
    by_text = [added[token] for token in EOG_TOKENS if token in added]
    return list(dict.fromkeys([i for i in declared if i is not None] + by_text))


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32_decimal(value: float) -> float:
    """The shortest decimal of a GGUF float32: 1e-05 where the file holds 9.99999974e-06 (the same float32)."""
    return float(str(np.float32(value)))
