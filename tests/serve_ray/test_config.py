"""--ray's settings: checked where they are made, and what the deployment is built with (no cluster)."""

import pytest

from ember.config import EngineConfig, ServerConfig
from ember.config.schema import ConfigError


def test_autoscale_range():
    assert ServerConfig(ray=True, autoscale="1:4").autoscale_range() == (1, 4)
    assert ServerConfig(ray=True).autoscale_range() is None


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"replicas": 2}, "replicas"),
        ({"ray_address": "ray://head:10001"}, "ray_address"),
        ({"ray": True, "autoscale": "4"}, "autoscale"),
        ({"ray": True, "autoscale": "3:2"}, "autoscale"),
        ({"ray": True, "autoscale": "0:2"}, "autoscale"),
        ({"ray": True, "autoscale": "1:2", "replicas": 3}, "replicas"),
    ],
)
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(ConfigError) as info:
        ServerConfig(**kw)
    assert field in str(info.value)


def test_the_deployment_carries_the_settings():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'ember[ray]'")
    from ember.serve_ray.deploy import deployment, deployment_options

    fixed = deployment_options(EngineConfig(), ServerConfig(ray=True, replicas=3, replica_threads=2))
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 2}
    assert fixed["request_router_config"].request_router_class.endswith(":EmberRequestRouter")
    scaled = deployment_options(EngineConfig(), ServerConfig(ray=True, autoscale="1:4", autoscale_target=3))
    cfg = scaled["autoscaling_config"]
    assert "num_replicas" not in scaled
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 4, 3)
    assert deployment(EngineConfig(), ServerConfig(ray=True)) is not None  # Ray Serve takes the options
