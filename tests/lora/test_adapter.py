"""ember/lora/adapter.py on untrusted adapter files: regex target_modules only in a subset that cannot
backtrack badly, and file sizes capped before anything is read."""

from __future__ import annotations

import json
import time

import pytest

from ember.lora.adapter import (
    MAX_ADAPTER_BYTES,
    MODULES,
    AdapterError,
    LoRAAdapter,
    _check_config,
    max_weights_bytes,
    precheck,
)
from ember.models.config import ModelConfig

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
)


def _targets(target_modules) -> set[str]:
    config = {"peft_type": "LORA", "r": 4, "target_modules": target_modules}
    return _check_config("a", config, 8)[2]


@pytest.mark.parametrize(
    ("pattern", "modules"),
    [  # as PEFT-made configs and PEFT's docs write them
        (r".*\.(q_proj|v_proj)", {"q_proj", "v_proj"}),
        (r".*(q_proj|v_proj)$", {"q_proj", "v_proj"}),
        (
            r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
            {"q_proj", "k_proj", "v_proj", "o_proj"},
        ),
        (r".*layers\.(0|1)\.mlp\.(?:gate_proj|up_proj)", {"gate_proj", "up_proj"}),
        (r".*\.mlp\..*", {"gate_proj", "up_proj", "down_proj"}),
        ("all-linear", set(MODULES)),
    ],
)
def test_regexes_peft_writes_are_taken(pattern, modules):
    assert _targets(pattern) == modules


@pytest.mark.parametrize(
    "pattern",
    [
        "(a+)+$",  # the classic: exponential on a near miss
        "(a|a)*b",
        "(.*a){12}",
        "(?:a*)*z",
        r"(\w+\s?)+$",
        "^(([a-z])+.)+[A-Z]([a-z])+$",
        ".*" * 6 + "z",  # polynomial, but of too high a degree
        "a" * 600,  # too long
        "[a-z]+_proj",  # character classes are outside the subset
        "q_proj|(",  # not even a regex
    ],
)
def test_other_regexes_are_refused_at_once(pattern):
    start = time.monotonic()
    with pytest.raises(AdapterError, match="target_modules regex .* is not one ember accepts"):
        _targets(pattern)
    assert time.monotonic() - start < 0.5


def test_the_slowest_regex_in_the_subset_is_quick():
    start = time.monotonic()
    with pytest.raises(AdapterError, match="non-empty list"):  # it matches no module
        _targets(".*.*.*.*x")
    assert time.monotonic() - start < 1


def _adapter(path, config_bytes: int = 0, weights_bytes: int = 0):
    path.mkdir()
    config = path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(b"")
    for file, size in ((config, config_bytes), (weights, weights_bytes)):
        if size:
            with open(file, "r+b") as f:
                f.truncate(size)  # sparse: that size by stat, nothing on disk
    return path


def test_an_oversized_config_is_refused_before_it_is_read(tmp_path):
    path = _adapter(tmp_path / "a", config_bytes=300 * 2**20)
    for check in (lambda: precheck("a", path), lambda: LoRAAdapter.load("a", path, CFG, 8)):
        start = time.monotonic()
        with pytest.raises(
            AdapterError, match="adapter_config.json is 314572800 bytes, more than the 1048576"
        ):
            check()
        assert time.monotonic() - start < 0.5


def test_weights_larger_than_the_base_model_allows_are_refused_before_they_are_read(tmp_path):
    cap = max_weights_bytes(CFG, 8)
    assert 2**20 < cap < MAX_ADAPTER_BYTES  # rank 8 on this tiny base: a little over the header allowance
    path = _adapter(tmp_path / "a", weights_bytes=cap + 1)
    with pytest.raises(AdapterError, match=f"rank up to 8 for this base model holds at most {cap}"):
        LoRAAdapter.load("a", path, CFG, 8)
    huge = _adapter(tmp_path / "b", weights_bytes=MAX_ADAPTER_BYTES + 1)
    with pytest.raises(AdapterError, match="more than the 1073741824 any adapter may have"):
        precheck("b", huge)
