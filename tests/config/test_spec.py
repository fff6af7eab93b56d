"""ember/config/spec.py: DeploymentSpec through YAML and JSON, read strictly."""

from __future__ import annotations

import pytest

from ember.config import ConfigError, DeploymentSpec, engine_config
from ember.config.server import ServerConfig


def _custom() -> DeploymentSpec:
    engine = engine_config(
        model="some/model",
        kv_cache_memory="512MiB",
        quantization="q8_0",
        speculative="draft:tiny",
        draft_num_layers=2,
        enable_prefix_caching=False,
    )
    server = ServerConfig(
        port=9000,
        api_keys=["a", "b"],
        cache_namespaces={"team": ["a", "b"]},
        loras={"sql": "/adapters/sql"},
        embedding_model=None,
    )
    return DeploymentSpec(engine, server)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("make", [DeploymentSpec, _custom])
def test_round_trip(tmp_path, suffix, make):
    spec = make()
    path = tmp_path / f"deploy{suffix}"
    spec.dump(path)
    assert DeploymentSpec.load(path) == spec
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec


def test_sizes_are_written_readably():
    data = _custom().to_dict()
    assert data["engine"]["cache"]["kv_cache_memory"] == "512MiB"
    assert data["model"] == "some/model"
    assert "kv_cache_memory: 2GiB" in DeploymentSpec().dump()


def test_adapters_imply_lora():
    assert _custom().engine.lora.enabled


def test_a_partial_file_takes_the_defaults(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("model: x\nengine:\n  cache:\n    block_size: 32\n")
    spec = DeploymentSpec.load(path)
    assert (spec.model, spec.engine.cache.block_size, spec.server.port) == ("x", 32, 8000)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"engine": {"quantization": "q5"}},
            r"^engine\.quantization: must be auto, q4_1, q8_0, int4, int8 or none",
        ),
        (
            {"engine": {"cache": {"blok_size": 8}}},
            r"^engine\.cache\.blok_size: unknown setting; did you mean block_size",
        ),
        ({"modle": "x"}, r"^modle: unknown setting; did you mean model"),
        ({"server": {"port": "http"}}, r"^server\.port: must be an integer"),
        ({"engine": {"model": "x"}}, r"^engine\.model: write the model at the top level"),
        ({"engine": {"cache": {"kv_cache_memory": "2XB"}}}, r"^engine\.cache\.kv_cache_memory: cannot read"),
        (
            {"engine": {"speculative": {"method": "medusa"}}},
            r"^engine\.speculative\.method: .*ngram or draft",
        ),
        ({"server": {"engine_mode": "fork"}}, r"^server\.engine_mode: must be process or thread"),
        ({"model": 3}, r"^model: must be a string"),
        ({"engine": [1]}, r"^engine: must be a mapping"),
    ],
)
def test_refusals_name_the_dotted_field(data, message):
    with pytest.raises(ConfigError, match=message):
        DeploymentSpec.from_dict(data)


def test_with_settings_takes_flat_names():
    spec = DeploymentSpec().with_settings({"max_num_seqs": 4, "port": 1234, "model": "m", "lora_modules": {}})
    assert (spec.engine.scheduler.max_num_seqs, spec.server.port, spec.model) == (4, 1234, "m")
    with pytest.raises(ConfigError, match="^lora: unknown setting"):
        DeploymentSpec().with_settings({"lora": {}})
