"""ember: an open inference platform with its own engine on PyTorch."""

from ember.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig, SpeculativeConfig
from ember.engine.async_engine import AsyncEngine
from ember.engine.llm_engine import LLMEngine
from ember.llm import LLM
from ember.outputs import CompletionOutput, Logprob, RequestOutput
from ember.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "CacheConfig",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "LoRAConfig",
    "SpeculativeConfig",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
]
