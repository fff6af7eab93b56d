"""The search space read from the schema: ranges to points, invalid combinations dropped, no duplicates."""

from __future__ import annotations

import pytest

from ember.config.schema import ConfigError, Range
from ember.optimize.space import candidates, lossless, points, space


def test_a_log_range_becomes_powers_of_two():
    assert points(Range(1, 256, log=True), 4) == [1, 8, 32, 256]
    assert points((True, False)) == [True, False]


def test_invalid_pairs_are_dropped_and_k_is_varied_only_with_speculation():
    values = space(
        fields=("dtype", "quantization", "speculative.method", "speculative.num_speculative_tokens"),
        vary={
            "dtype": "float32,bfloat16",
            "quantization": "none,int4",
            "speculative.num_speculative_tokens": "2,4",
        },
    )
    got = {
        (
            c.get("dtype"),
            c.get("quantization"),
            c.get("speculative.method"),
            c.get("speculative.num_speculative_tokens"),
        )
        for c in candidates(values)
    }
    assert ("float32", "int4", None, None) not in got  # int4 runs with bfloat16 only
    assert ("bfloat16", "int4", "ngram", 4) in got
    assert ("float32", None, None, 4) not in got  # k without speculation: the same engine, listed once
    assert len(got) == 3 * 3  # (f32, bf16, bf16+int4) x (off, ngram k=2, ngram k=4)


def test_lossless_is_float32_unquantized():
    values = space(fields=("dtype",), vary={"dtype": "float32,bfloat16"})
    assert [lossless(c) for c in candidates(values)] == [True, False]


def test_unknown_setting_is_refused():
    with pytest.raises(ConfigError, match="unknown setting; searchable:"):
        space(vary={"scheduler.max_seqs": "1,2"})


def test_the_default_candidate_undoes_what_is_held():
    from ember.config import EngineConfig
    from ember.optimize.space import default, held

    values = space(
        fields=(), vary={"scheduler.max_num_seqs": "1,8"}, fix={"cache.enable_prefix_caching": "false"}
    )
    base = EngineConfig()
    start = held(values, base)
    assert start.cache.enable_prefix_caching is False
    assert default(values, base).engine(start) == base
