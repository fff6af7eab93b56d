"""GGUF -> HF-layout conversion: tiny GGUFs written here the way llama.cpp writes them, and the real default model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize

import ember.models.gguf as gguf_module
from ember.models.catalog import DEFAULT_MODEL, ModelNotFoundError, known_model_file
from ember.models.config import ModelConfig
from ember.models.gguf import convert_gguf, llama3_rope_scaling
from ember.models.weights import load_state_dict

# A tiny model with grouped-query attention (4 query heads share 2 KV heads), so Q and K un-permute differently.
VOCAB_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, CONTEXT = 64, 4, 2, 16, 128, 2, 256
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_CPP_NAMES = {  # HF -> GGUF, as llama.cpp's convert_hf_to_gguf.py names them
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return VOCAB_SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]


def tiny_hf_state(arch: str, tied: bool, bias: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vocab = len(tiny_tokens())
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
        if bias:
            shapes |= {
                p + f"self_attn.{x}_proj.bias": (n * HEAD_DIM,)
                for x, n in [("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)]
            }
    return {name: rng.standard_normal(shape).astype(np.float32) * 0.1 for name, shape in shapes.items()}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: interleave each head's two rope halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    stem, _, suffix = hf_name.rpartition(".")
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if stem in top:
        return f"{top[stem]}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{LLAMA_CPP_NAMES[rest]}.{suffix}"


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    tied: bool = True,
    bias: bool = False,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    rope_freqs: np.ndarray | None = None,
    metadata: dict[str, tuple[object, GGUFValueType]] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write a GGUF as llama.cpp's converter would; return the HF weights it was written from."""
    state = tiny_hf_state(arch, tied, bias)
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    for key, (value, kind) in (metadata or {}).items():  # keys spelled `{arch}.rope...`
        writer.add_key_value(key.format(arch=arch), value, kind)
    tokens = tiny_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in VOCAB_SPECIALS else 1 for t in tokens])  # 3 = CONTROL
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for hf_name, w in state.items():
        # Llama's Q/K rows are interleaved for ggml's rope; Qwen2's rope already matches HF's.
        if arch == "llama" and ".q_proj." in hf_name:
            w = llama_cpp_permute(w, HEADS)
        elif arch == "llama" and ".k_proj." in hf_name:
            w = llama_cpp_permute(w, KV_HEADS)
        kind = qtype if w.ndim == 2 else GGMLQuantizationType.F32  # llama.cpp keeps norms and biases f32
        writer.add_tensor(gguf_name(hf_name), quantize(w, kind), raw_dtype=kind)
    for name, w in (extra_tensors or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


def llama_cpp_rope_factors(
    factor: float, low: float, high: float, context: int, dim: int, theta: float
) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors, as written there."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            factors.append(1)
        elif wavelen > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# --- weights --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, tied, bias",
    [("llama", True, False), ("llama", False, True), ("qwen2", True, True), ("qwen2", False, True)],
)
def test_roundtrip_recovers_the_hf_weights(tmp_path: Path, arch: str, tied: bool, bias: bool) -> None:
    # f32 storage is lossless, so anything but equality is a wrong name, shape or Q/K un-permutation.
    original = write_tiny_gguf(tmp_path / "tiny.gguf", arch, tied, bias)
    state = load_state_dict(convert_gguf(tmp_path / "tiny.gguf"))
    assert set(state) == set(original)
    assert ("lm_head.weight" in state) is not tied
    for name, w in original.items():
        assert torch.equal(state[name], torch.from_numpy(w)), name


# No Llama-with-bias case: transformers builds its GGUF Llama without attention_bias and drops those tensors.
@pytest.mark.parametrize("arch, bias", [("llama", False), ("qwen2", True)])
def test_quantized_gguf_matches_transformers_loader(tmp_path: Path, arch: str, bias: bool) -> None:
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    write_tiny_gguf(tmp_path / "tiny.gguf", arch, tied=False, bias=bias, qtype=GGMLQuantizationType.Q8_0)
    out = convert_gguf(tmp_path / "tiny.gguf")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    expected = reference.state_dict()
    state = load_state_dict(out)
    assert set(state) == set(expected)
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), name
    # The directory loads as an ordinary HF checkpoint and computes what the GGUF does: config and weights agree.
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_unknown_tensor_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    experts = {"blk.0.ffn_gate_exps.weight": np.zeros((4, FFN, HIDDEN), dtype=np.float32)}
    write_tiny_gguf(tmp_path / "moe.gguf", extra_tensors=experts)
    with pytest.raises(ValueError, match="blk.0.ffn_gate_exps.weight.*dense"):
        convert_gguf(tmp_path / "moe.gguf")
    assert list((cache_dir / "converted").iterdir()) == []  # the half-written temp dir is gone


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path, cache_dir: Path) -> None:
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: llama, qwen2"):
        convert_gguf(tmp_path / "gpt2.gguf")
    assert list((cache_dir / "converted").iterdir()) == []


# --- config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_config_describes_the_model(tmp_path: Path, arch: str) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", arch, tied=True, bias=arch == "qwen2")
    config = ModelConfig.from_dir(convert_gguf(tmp_path / "tiny.gguf"))
    assert (config.model_type, config.hidden_size, config.intermediate_size) == (arch, HIDDEN, FFN)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        LAYERS,
        HEADS,
        KV_HEADS,
    )
    assert (config.head_dim, config.vocab_size, config.max_position_embeddings) == (
        HEAD_DIM,
        len(tiny_tokens()),
        CONTEXT,
    )
    assert config.rms_norm_eps == 1e-5  # the decimal, not float32's 9.99999974e-06
    assert config.rope_theta == 500000.0 and config.rope_scaling is None
    assert config.tie_word_embeddings and config.attention_bias is (arch == "qwen2")
    # <|im_end|> is the declared eos; <|endoftext|> also ends generation in llama.cpp, so it stops here too.
    assert config.bos_token_id == 1 and config.eos_token_ids == [2, 0]


def test_config_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoConfig

    write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tied=True)
    ours = AutoConfig.from_pretrained(convert_gguf(tmp_path / "tiny.gguf"))
    theirs = AutoConfig.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert_same_config(ours, theirs)


def assert_same_config(ours: object, theirs: object) -> None:
    fields = [
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
        "eos_token_id", "pad_token_id", "rope_parameters",
    ]  # fmt: skip
    for field in fields:
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-7)


@pytest.mark.parametrize(
    "factor, low, high, context", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 2.0, 4096)]
)
def test_llama3_rope_scaling_is_recovered_from_rope_freqs(
    factor: float, low: float, high: float, context: int
) -> None:
    stored = llama_cpp_rope_factors(factor, low, high, context, dim=128, theta=500000.0)
    assert llama3_rope_scaling(stored, head_dim=128, rope_theta=500000.0) == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": context,
    }


def test_rope_freqs_that_are_not_llama3_are_refused() -> None:
    stored = np.linspace(1.0, 8.0, 64, dtype=np.float32)
    with pytest.raises(ValueError, match="does not follow Llama 3 rope scaling"):
        llama3_rope_scaling(stored, head_dim=128, rope_theta=500000.0)


@pytest.mark.parametrize(
    "rope_freqs, metadata, expected",
    [
        # head_dim 16 leaves one frequency between the plateaus: too few to fit, so Llama 3.1's values are checked.
        (llama_cpp_rope_factors(8.0, 1.0, 4.0, 8192, HEAD_DIM, 500000.0), {}, {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }),
        (None, {"{arch}.rope.scaling.type": ("linear", GGUFValueType.STRING),
                "{arch}.rope.scaling.factor": (2.0, GGUFValueType.FLOAT32)},
         {"rope_type": "linear", "factor": 2.0}),
    ],
)  # fmt: skip
def test_rope_scaling_reaches_the_config(
    tmp_path: Path, rope_freqs: np.ndarray | None, metadata: dict, expected: dict
) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf", rope_freqs=rope_freqs, metadata=metadata)
    out = convert_gguf(tmp_path / "tiny.gguf")
    assert ModelConfig.from_dir(out).rope_scaling == expected
    assert "rope_freqs.weight" not in load_state_dict(out)


# --- tokenizer --------------------------------------------------------------------------------------------------


def test_tokenizer_and_chat_template_are_saved(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    write_tiny_gguf(tmp_path / "tiny.gguf")
    tokenizer = AutoTokenizer.from_pretrained(convert_gguf(tmp_path / "tiny.gguf"))
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in ["hello world", "<|im_start|>user\nhell<|im_end|>", " w ü 12"]:
        assert tokenizer.encode(text) == reference.encode(text)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


# --- cache ----------------------------------------------------------------------------------------------------


def test_second_call_reuses_the_conversion(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    first = convert_gguf(tmp_path / "tiny.gguf")
    assert first.parent == cache_dir / "converted" and first.name.startswith("tiny-")
    written = (first / "model.safetensors").stat().st_mtime_ns

    def no_reading(*args: object) -> None:
        raise AssertionError("a cache hit must not read the GGUF")

    monkeypatch.setattr(gguf_module, "GGUFReader", no_reading)
    assert convert_gguf(tmp_path / "tiny.gguf") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == written
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dirs left behind


def test_a_changed_file_converts_anew(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    first = convert_gguf(tmp_path / "tiny.gguf")
    stat = (tmp_path / "tiny.gguf").stat()
    os.utime(tmp_path / "tiny.gguf", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert convert_gguf(tmp_path / "tiny.gguf") != first


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        convert_gguf(tmp_path / "absent.gguf")


# --- the real default model (SmolLM2-135M-Instruct, Q4_1) -------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the packaged GGUF, its conversion), converted once for this module."""
    try:
        gguf_path = known_model_file(DEFAULT_MODEL)
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return gguf_path, convert_gguf(gguf_path)


@pytest.mark.slow
def test_default_model_weights_equal_transformers_gguf_load(smollm2: tuple[Path, Path]) -> None:
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    gguf_path, out = smollm2
    expected = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).state_dict()
    state = load_state_dict(out)
    assert set(expected) - set(state) == {
        "lm_head.weight"
    }  # tied: transformers lists the shared tensor twice
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), name
    assert torch.equal(expected["lm_head.weight"], state["model.embed_tokens.weight"])


@pytest.mark.slow
def test_default_model_config_matches_transformers(smollm2: tuple[Path, Path]) -> None:
    from transformers import AutoConfig

    gguf_path, out = smollm2
    assert_same_config(
        AutoConfig.from_pretrained(out),
        AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name),
    )
    config = ModelConfig.from_dir(out)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.rope_theta == 100000.0 and config.tie_word_embeddings
    assert config.bos_token_id == 1 and config.eos_token_ids == [2, 0]  # <|im_end|>, then <|endoftext|>
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 0]


@pytest.mark.slow
def test_default_model_tokenizer_and_chat_format(smollm2: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    gguf_path, out = smollm2
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    texts = [
        "Hello, world!",
        "  leading spaces\tand tabs\n",
        "ünïcödé 漢字 🙂",
        "<|im_start|>user\nhi<|im_end|>",
        "3.14159",
    ]
    for text in texts:
        assert tokenizer.encode(text) == reference.encode(text), text
    assert tokenizer.encode("Hello") == [19556]  # no BOS: the GGUF says add_bos_token false, as SmolLM2 does
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
