"""One config schema: each setting declared once (schema.setting) with its help, default, CLI flag and
search range. The CLI, `LLM(**kw)`, spec files and the optimizer's search space are read from it.

- engine.py: the engine's dataclasses (cache, scheduler, LoRA, speculative), flat keyword arguments
- server.py: what `ember serve` adds (listener, keys, adapters, drain)
- spec.py: DeploymentSpec (model + engine + server) to and from YAML/JSON
- cli.py: typer options generated from the schema (imported by ember.cli only)
"""

from ember.config.engine import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    SchedulerConfig,
    SpeculativeConfig,
    engine_config,
    engine_kwargs,
)
from ember.config.schema import ConfigError, Range, search_space, setting
from ember.config.server import ServerConfig
from ember.config.spec import DeploymentSpec
from ember.config.units import format_bytes, parse_bytes

__all__ = [
    "CacheConfig",
    "ConfigError",
    "DeploymentSpec",
    "EngineConfig",
    "LoRAConfig",
    "Range",
    "SchedulerConfig",
    "ServerConfig",
    "SpeculativeConfig",
    "engine_config",
    "engine_kwargs",
    "format_bytes",
    "parse_bytes",
    "search_space",
    "setting",
]
