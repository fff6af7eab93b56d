"""ember/config/schema.py: every setting declared once, with what the CLI and the optimizer read."""

from __future__ import annotations

import pytest

from ember.config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    Range,
    ServerConfig,
    SpeculativeConfig,
    format_bytes,
    parse_bytes,
    search_space,
)
from ember.config.schema import leaves
from ember.config.spec import spec_settings
from ember.models.catalog import DEFAULT_MODEL


@pytest.mark.parametrize("cls", [EngineConfig, ServerConfig])
def test_every_setting_has_help_and_a_flag(cls):
    for leaf in leaves(cls):
        assert leaf.setting.help.strip(), f"{leaf.dotted} has no help"
        assert leaf.flag.startswith("--"), leaf.dotted


def test_flags_and_aliases_are_unique():
    names = [n for _, leaf in spec_settings().values() for n in (leaf.flag, *leaf.setting.aliases)]
    assert len(names) == len(set(names))


def test_defaults_match_the_catalog_and_one_kv_budget():
    assert EngineConfig().model == DEFAULT_MODEL
    assert CacheConfig().kv_cache_memory == 2 * 2**30


def test_search_space_covers_what_the_optimizer_tunes():
    space = search_space(EngineConfig)
    for name in (
        "cache.block_size",
        "cache.kv_cache_memory",
        "cache.enable_prefix_caching",
        "scheduler.max_num_seqs",
        "scheduler.max_num_batched_tokens",
        "dtype",
        "quantization",
        "speculative.method",
        "speculative.num_speculative_tokens",
    ):
        assert name in space
    assert isinstance(space["scheduler.max_num_seqs"], Range)
    for value in space["quantization"]:  # every candidate is a value the schema accepts
        assert value in EngineConfig.__dataclass_fields__["quantization"].metadata["setting"].choices


@pytest.mark.parametrize("text", ["2GiB", "512MiB", "3KiB", "1000001"])
def test_sizes_print_readably_and_read_back_equal(text):
    n = parse_bytes(text)
    assert parse_bytes(format_bytes(n)) == n
    assert str(format_bytes(n)) == text


def test_refusals_name_the_field_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"^quantization: must be auto, q4_1, q8_0, int4, int8 or none"):
        EngineConfig(quantization="q5")
    with pytest.raises(ConfigError, match=r"^dtype: must be auto, float32, bfloat16 or float16"):
        EngineConfig(dtype="fp8")
    with pytest.raises(ConfigError, match=r"^block_size: must be at least 1"):
        CacheConfig(block_size=0)
    with pytest.raises(ConfigError, match=r"^block_size: must be an integer"):
        CacheConfig(block_size="16")
    with pytest.raises(ConfigError, match=r"^engine_mode: must be process or thread"):
        ServerConfig(engine_mode="fork")


def test_none_reads_as_off():
    assert EngineConfig(quantization="None").quantization is None
    assert ServerConfig(embedding_model="none").embedding_model is None
    assert SpeculativeConfig(method="off").method is None


def test_draft_model_form():
    spec = SpeculativeConfig(method="draft:some/model", draft_num_layers=2)
    assert (spec.method, spec.draft_model, spec.draft_num_layers) == ("draft", "some/model", 2)
