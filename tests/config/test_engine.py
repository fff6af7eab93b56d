"""ember/config/engine.py: LLM(**kw)'s flat keyword arguments, derived from the schema."""

from __future__ import annotations

import pytest

from ember.config import EngineConfig, SpeculativeConfig, engine_config, engine_kwargs
from ember.config.schema import leaves


def test_every_setting_has_one_flat_name():
    assert len(engine_kwargs()) == len(leaves(EngineConfig))
    for name in ("block_size", "kv_cache_memory", "num_blocks", "enable_prefix_caching", "max_num_seqs"):
        assert name in engine_kwargs()
    for name in ("max_num_batched_tokens", "enable_lora", "max_loras", "max_lora_rank", "speculative"):
        assert name in engine_kwargs()
    for name in ("num_speculative_tokens", "draft_num_layers", "device", "dtype", "quantization", "seed"):
        assert name in engine_kwargs()
    assert "max_model_len" in engine_kwargs() and "chat_template" in engine_kwargs()


def test_flat_kwargs_land_in_their_sections():
    config = engine_config(
        model="m",
        num_blocks=8,
        block_size=4,
        kv_cache_memory="1GiB",
        max_num_batched_tokens=16,
        enable_lora=True,
        max_lora_rank=16,
        speculative="ngram",
        num_speculative_tokens=3,
        seed=7,
    )
    assert (config.model, config.seed) == ("m", 7)
    assert (config.cache.num_blocks, config.cache.block_size, config.cache.kv_cache_memory) == (8, 4, 2**30)
    assert config.scheduler.max_num_batched_tokens == 16
    assert config.lora.enabled and config.lora.max_rank == 16
    assert (config.speculative.method, config.speculative.num_speculative_tokens) == ("ngram", 3)


def test_no_kwargs_is_the_schema_default():
    assert engine_config() == EngineConfig()


def test_an_unknown_keyword_is_refused_by_name():
    with pytest.raises(TypeError, match="unknown engine setting 'blocksize'; did you mean block_size"):
        engine_config(blocksize=4)


def test_a_whole_section_takes_its_own_fields_inside():
    spec = SpeculativeConfig(method="draft", draft_model="x")
    assert engine_config(speculative=spec).speculative is spec
    with pytest.raises(ValueError, match="pass num_speculative_tokens inside the SpeculativeConfig"):
        engine_config(speculative=spec, num_speculative_tokens=3)


def test_a_bad_value_names_the_section_field():
    with pytest.raises(ValueError, match=r"^cache\.block_size: must be at least 1"):
        engine_config(block_size=0)
