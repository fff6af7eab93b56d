"""A BERT encoder (absolute positions, post-LayerNorm, GELU), for embedding models such as all-MiniLM-L6-v2.

Unlike the decoder path there is no KV cache and no flat batch: sequences come padded to a rectangle
[batch, seq] with a mask marking the real tokens, and every token attends to every real token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.weights import load_state_dict

# HF `hidden_act` -> the `approximate` argument of F.gelu. "gelu" is the exact (erf) form BERT was trained with.
GELU_APPROXIMATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
# Checkpoint tensors the encoder does not use: the [CLS] pooler and MLM heads of pre-training, and a buffer of
# position ids that follows from the sequence length.
UNUSED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"

    def __post_init__(self) -> None:
        if self.hidden_act not in GELU_APPROXIMATIONS:
            raise ValueError(
                f"hidden_act '{self.hidden_act}' is not supported; supported: {', '.join(GELU_APPROXIMATIONS)}"
            )
        if self.position_embedding_type != "absolute":
            raise ValueError(
                f"position_embedding_type '{self.position_embedding_type}' is not supported; only 'absolute'"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> BertConfig:
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"model_type '{d['model_type']}' is not a BERT model; expected 'bert'")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            max_position_embeddings=d.get("max_position_embeddings", 512),
            type_vocab_size=d.get("type_vocab_size", 2),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            hidden_act=d.get("hidden_act", "gelu"),
            position_embedding_type=d.get("position_embedding_type", "absolute"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> BertConfig:
        return cls.from_hf_dict(json.loads((Path(path) / "config.json").read_text()))


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [B, S, hidden]."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Every input is a single segment, so the token type is 0 throughout: one row, broadcast.
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.norm(x + self.token_type_embeddings.weight[0])


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        # query, key and value in one matmul: [3 * hidden, hidden]
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.attn_out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gelu_approximate = GELU_APPROXIMATIONS[cfg.hidden_act]

    def forward(
        self,
        x: torch.Tensor,  # [B, S, hidden]
        key_mask: torch.Tensor,  # [B, 1, 1, S] bool, True for real tokens
    ) -> torch.Tensor:
        b, s, hidden = x.shape
        # [B, S, 3 * hidden] -> 3 x [B, heads, S, head_dim]
        q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # Padding keys are masked out; padding queries still attend (to real keys) and are dropped by pooling.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        o = o.transpose(1, 2).reshape(b, s, hidden)
        # Post-LN: the residual sum is normalised, not the sublayer input.
        x = self.attn_norm(x + self.attn_out(o))
        h = F.gelu(self.ffn_in(x), approximate=self.gelu_approximate)
        return self.ffn_norm(x + self.ffn_out(h))


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S], right-padded
        attention_mask: torch.Tensor,  # [B, S] bool, True for real tokens
    ) -> torch.Tensor:
        """-> the last layer's hidden states, [B, S, hidden]; rows at padded positions are meaningless."""
        key_mask = attention_mask[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x

    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load HF `BertModel` weights (with or without a `bert.` prefix), fusing query/key/value."""
        if any(name.startswith("bert.") for name in weights):
            weights = {name.removeprefix("bert."): t for name, t in weights.items()}
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ValueError(f"weight '{name}' is missing from the checkpoint")
            used.add(name)
            return weights[name]

        loaded: dict[str, torch.Tensor] = {}
        for kind in ("word", "position", "token_type"):
            loaded[f"embeddings.{kind}_embeddings.weight"] = take(f"embeddings.{kind}_embeddings.weight")
        hf_names = {
            "attn_out": "attention.output.dense",
            "attn_norm": "attention.output.LayerNorm",
            "ffn_in": "intermediate.dense",
            "ffn_out": "output.dense",
            "ffn_norm": "output.LayerNorm",
        }
        for p in ("weight", "bias"):
            loaded[f"embeddings.norm.{p}"] = take(f"embeddings.LayerNorm.{p}")
            for i in range(self.config.num_hidden_layers):
                src, dst = f"encoder.layer.{i}.", f"layers.{i}."
                loaded[dst + f"qkv.{p}"] = torch.cat(
                    [take(src + f"attention.self.{m}.{p}") for m in ("query", "key", "value")]
                )
                for ours, theirs in hf_names.items():
                    loaded[dst + f"{ours}.{p}"] = take(src + f"{theirs}.{p}")
        unknown = sorted(n for n in weights if n not in used and not n.startswith(UNUSED_PREFIXES))
        if unknown:
            raise ValueError(
                f"the checkpoint has weights a BERT encoder does not use ({', '.join(unknown[:5])}"
                f"{', ...' if len(unknown) > 5 else ''}); is it a BERT model with "
                f"{self.config.num_hidden_layers} layers, as config.json says?"
            )
        own = self.state_dict()
        for name, tensor in loaded.items():
            if own[name].shape != tensor.shape:
                raise ValueError(
                    f"weight '{name}' has shape {tuple(tensor.shape)}, the config implies {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)


def load_bert(path: str | Path, dtype: torch.dtype, device: str | torch.device) -> BertModel:
    """A `BertModel` with the config and safetensors weights of the HF-layout directory `path`, in eval mode."""
    config = BertConfig.from_dir(path)
    # Construct without initialising (the checkpoint overwrites every parameter), then load.
    with torch.device("meta"):
        model = BertModel(config)
    model = model.to_empty(device="cpu")
    model.load_hf_state_dict(load_state_dict(Path(path), dtype=torch.float32))
    return model.to(device=device, dtype=dtype).eval()
