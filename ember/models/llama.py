"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5) over a paged KV cache.

One model covers the family: Qwen2 adds q/k/v biases, Mistral an optional sliding window, Llama 3 a
rope scaling; all share RMSNorm, RoPE, grouped-query attention and a SwiGLU MLP. The forward pass takes
a flat batch of tokens (no padding, no batch dimension) and returns hidden states; logits are computed
only for the rows the sampler needs. The hot ops (RMSNorm, RoPE with the KV write, decode attention)
come from the backend the model is built with (ember.backends); the fused projections follow
ember.models.projections.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ember.backends import REFERENCE, Backend
from ember.models.attention import AttentionMetadata, PackedMetadata, packed_attention, paged_attention
from ember.models.config import ModelConfig
from ember.models.projections import BY_NAME, PROJECTIONS
from ember.models.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, backend: Backend = REFERENCE):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.set_backend(backend)

    def set_backend(self, backend: Backend) -> None:
        self.backend = backend
        self._rms_norm = backend.rms_norm  # held as a plain function: the call is the kernel's, nothing more

    @property
    def cpu_kernel(self) -> bool:
        return self.backend.name == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        return self._rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: Backend = REFERENCE):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.q_size
        self.qkv_proj = BY_NAME["qkv_proj"].linear(cfg)  # q, k and v in one matmul
        self.o_proj = BY_NAME["o_proj"].linear(cfg)
        self.scale = self.head_dim**-0.5
        self.set_backend(backend)

    def set_backend(self, backend: Backend) -> None:
        self.backend = backend
        self._rope_write_kv = backend.rope_write_kv
        self._decode_attention = backend.decode_attention
        self._prefill_attention = backend.prefill_attention

    @property
    def cpu_kernels(self) -> bool:
        """Whether ember's C kernels run this module (read-only; the backend decides)."""
        return self.backend.name == "cpu"

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # [T, 1, D] each
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,  # in the backend's KV layout; None: training
        meta: AttentionMetadata | PackedMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        cos, sin = cos_sin
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        if kv_cache is None:  # training: dense over packed examples, pure torch ops so autograd runs
            kv_size = self.num_kv_heads * self.head_dim
            q, k, v = qkv.split([self.q_size, kv_size, kv_size], dim=-1)
            q, k = apply_rotary(cos_sin, q.view(t, self.num_heads, -1), k.view(t, self.num_kv_heads, -1))
            o = packed_attention(q, k, v.view(t, self.num_kv_heads, -1), meta, self.scale)
            return self.o_proj(o.reshape(t, self.q_size))
        k_cache, v_cache = kv_cache
        q = self._rope_write_kv(
            qkv, cos.view(t, -1), sin.view(t, -1), meta.slot_mapping, k_cache, v_cache, self.num_heads
        )  # [T, Hq, D]
        o = paged_attention(
            q, k_cache, v_cache, meta, self.scale, self._decode_attention, self._prefill_attention
        )
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: Backend = REFERENCE):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = BY_NAME["gate_up_proj"].linear(cfg)
        self.down_proj = BY_NAME["down_proj"].linear(cfg)
        self.set_backend(backend)

    def set_backend(self, backend: Backend) -> None:
        self._silu_and_mul = backend.silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: Backend = REFERENCE):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.self_attn = Attention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.mlp = MLP(cfg, backend)
        self.set_backend(backend)

    def set_backend(self, backend: Backend) -> None:
        self._add_rms_norm = backend.add_rms_norm

    def forward(self, x, cos_sin, kv_cache, meta):
        norm = self.post_attention_layernorm
        h, x = self._add_rms_norm(
            self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta), x, norm.weight, norm.eps
        )
        return x + self.mlp(h)

    def forward_residual(self, x, residual, cos_sin, kv_cache, meta):
        """The layer with its last residual add left to the next norm: -> (mlp output, residual), whose
        sum is `forward`'s output. Every add then runs inside a norm's fused kernel (x, with residual None:
        the embeddings, the first layer's input)."""
        norm = self.input_layernorm
        if residual is None:
            residual, h = x, norm(x)
        else:
            h, residual = self._add_rms_norm(x, residual, norm.weight, norm.eps)
        norm = self.post_attention_layernorm
        h, residual = self._add_rms_norm(
            self.self_attn(h, cos_sin, kv_cache, meta), residual, norm.weight, norm.eps
        )
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None, backend: Backend = REFERENCE):
        super().__init__()
        self.config = cfg
        self.backend = backend
        self.checkpoint_layers = False  # activation checkpointing, training only
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(
            cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None,
        meta: AttentionMetadata | PackedMetadata,
    ) -> torch.Tensor:
        """-> hidden states after the final norm, [T, hidden]. kv_caches None with PackedMetadata: the
        dense training pass (ember.tune), where `checkpoint_layers` recomputes each layer in backward."""
        x = self.embed_tokens(input_ids)
        cos_sin = self.rope.cos_sin(positions, x.dtype)
        if kv_caches is None:
            for layer in self.layers:
                if self.checkpoint_layers and torch.is_grad_enabled():
                    x = checkpoint(layer, x, cos_sin, None, meta, use_reentrant=False)
                else:
                    x = layer(x, cos_sin, None, meta)
            return self.norm(x)
        residual = None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x, residual = layer.forward_residual(x, residual, cos_sin, kv, meta)
        if residual is None:  # no layers
            return self.norm(x)
        return self.backend.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    def set_backend(self, backend: Backend) -> None:
        """Run the model's ops on `backend` from now on (the KV cache must be in its layout)."""
        self.backend = backend
        for module in self.modules():
            if isinstance(module, RMSNorm | Attention | MLP | DecoderLayer):
                module.set_backend(backend)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in fp32."""
        return self.lm_head(hidden).float()

    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load HF-named weights, fusing q/k/v and gate/up into the packed projections."""
        own = self.state_dict()
        loaded: dict[str, torch.Tensor] = {}

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ValueError(f"weight '{name}' is missing from the checkpoint")
            return weights[name]

        loaded["embed_tokens.weight"] = take("model.embed_tokens.weight")
        loaded["norm.weight"] = take("model.norm.weight")
        if not self.config.tie_word_embeddings:
            loaded["lm_head.weight"] = take("lm_head.weight")
        norms = ("input_layernorm", "post_attention_layernorm")
        for i in range(self.config.num_hidden_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            for p in PROJECTIONS:  # each fused weight is its HF parts stacked along the output rows
                hf = [f"{src}{p.group}.{module}" for module, _ in p.parts]
                loaded[f"{dst}{p.group}.{p.name}.weight"] = torch.cat([take(h + ".weight") for h in hf])
                if p.has_bias(self.config):
                    loaded[f"{dst}{p.group}.{p.name}.bias"] = torch.cat([take(h + ".bias") for h in hf])
            for norm in norms:
                loaded[f"{dst}{norm}.weight"] = take(f"{src}{norm}.weight")
        for name, tensor in loaded.items():
            if own[name].shape != tensor.shape:
                raise ValueError(
                    f"weight '{name}' has shape {tuple(tensor.shape)}, the config implies {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)
