"""ember: an open inference platform with its own engine on PyTorch.

The public names are imported on first use (PEP 562), not here: importing any `ember.x` runs this file
first, and an eager import of the engine would load torch into every light user (the protocol layer, a
gateway, `ember --help`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and editors (`X as X`: re-exported); at run time __getattr__ does it
    from ember.config import CacheConfig as CacheConfig
    from ember.config import EngineConfig as EngineConfig
    from ember.config import LoRAConfig as LoRAConfig
    from ember.config import SchedulerConfig as SchedulerConfig
    from ember.config import SpeculativeConfig as SpeculativeConfig
    from ember.engine.async_engine import AsyncEngine as AsyncEngine
    from ember.engine.llm_engine import LLMEngine as LLMEngine
    from ember.llm import LLM as LLM
    from ember.outputs import CompletionOutput as CompletionOutput
    from ember.outputs import Logprob as Logprob
    from ember.outputs import RequestOutput as RequestOutput
    from ember.sampling_params import SamplingParams as SamplingParams

# public name -> the module that defines it
_HOMES = {
    "LLM": "ember.llm",
    "AsyncEngine": "ember.engine.async_engine",
    "LLMEngine": "ember.engine.llm_engine",
    "CacheConfig": "ember.config",
    "EngineConfig": "ember.config",
    "LoRAConfig": "ember.config",
    "SchedulerConfig": "ember.config",
    "SpeculativeConfig": "ember.config",
    "CompletionOutput": "ember.outputs",
    "Logprob": "ember.outputs",
    "RequestOutput": "ember.outputs",
    "SamplingParams": "ember.sampling_params",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ember' has no attribute '{name}'")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
