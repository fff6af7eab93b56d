"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5) over a paged KV cache.

One model covers the family: Qwen2 adds q/k/v biases, Mistral an optional sliding window, Llama 3 a
rope scaling; all share RMSNorm, RoPE, grouped-query attention and a SwiGLU MLP. The forward pass takes
a flat batch of tokens (no padding, no batch dimension) and returns hidden states; logits are computed
only for the rows the sampler needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels import cpu as cpu_kernels
from ember.models.attention import AttentionMetadata, paged_attention, write_kv
from ember.models.config import ModelConfig
from ember.models.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.cpu_kernel = False  # float32 on the CPU: ember's C kernel (see use_cpu_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel:
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 and scale after casting back, as HF does, so low-precision runs agree too.
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        # q, k and v in one matmul: [q_size + 2 * kv_size, hidden]
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5
        self.cpu_kernels = False

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # [T, 1, D] each
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        k_cache, v_cache = kv_cache
        if self.cpu_kernels:
            cos, sin = cos_sin
            qkv = self.qkv_proj(x).contiguous()
            q = cpu_kernels.rope_write_kv(
                qkv, cos.view(t, -1), sin.view(t, -1), meta.slot_mapping, k_cache, v_cache, self.num_heads
            )
            o = paged_attention(q, k_cache, v_cache, meta, self.scale, cpu_kernel=True)
            return self.o_proj(o.reshape(t, self.q_size))
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(cos_sin, q, k)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos_sin, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


def swap_projections(model: LlamaForCausalLM, make, make_head=None) -> None:
    """Replace, in place, every decoder layer's four projections with make(projection) and the LM head with
    make_head(lm_head) (make, when not given): how quantization and the CPU packing install themselves."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = make(attn.qkv_proj)
        attn.o_proj = make(attn.o_proj)
        mlp.gate_up_proj = make(mlp.gate_up_proj)
        mlp.down_proj = make(mlp.down_proj)
    model.lm_head = (make_head or make)(model.lm_head)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
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
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """-> hidden states after the final norm, [T, hidden]."""
        x = self.embed_tokens(input_ids)
        cos_sin = self.rope.cos_sin(positions, x.dtype)
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos_sin, kv, meta)
        return self.norm(x)

    def use_cpu_kernels(self, on: bool = True) -> None:
        """Run RMSNorm, the rotary embedding with the KV cache write, and decode attention through ember's C
        kernels (ember.kernels.cpu): a float32 model on an AVX2 CPU. The PyTorch code stays the reference."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.cpu_kernel = on
            elif isinstance(module, Attention):
                module.cpu_kernels = on

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
        for i in range(self.config.num_hidden_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            att = src + "self_attn."
            loaded[dst + "self_attn.qkv_proj.weight"] = torch.cat(
                [take(att + f"{p}_proj.weight") for p in "qkv"]
            )
            if self.config.attention_bias:
                loaded[dst + "self_attn.qkv_proj.bias"] = torch.cat(
                    [take(att + f"{p}_proj.bias") for p in "qkv"]
                )
            loaded[dst + "self_attn.o_proj.weight"] = take(att + "o_proj.weight")
            loaded[dst + "mlp.gate_up_proj.weight"] = torch.cat(
                [take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")]
            )
            loaded[dst + "mlp.down_proj.weight"] = take(src + "mlp.down_proj.weight")
            loaded[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
            loaded[dst + "post_attention_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        for name, tensor in loaded.items():
            if own[name].shape != tensor.shape:
                raise ValueError(
                    f"weight '{name}' has shape {tuple(tensor.shape)}, the config implies {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)
