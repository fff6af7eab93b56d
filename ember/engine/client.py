"""What the serving layer (HTTP routes, later a Ray Serve replica or a pipeline step) needs of an engine.

`AsyncEngine` implements it over a core on a thread of this process or in a process of its own; any
other transport (a remote replica) implements the same.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from ember.engine.messages import CoreStats, EngineInfo
from ember.engine.processors import InputProcessor
from ember.outputs import RequestOutput
from ember.tokenizer import Tokenizer


class EngineState(enum.Enum):
    LOADING = "loading"  # the core is loading the model: nothing can be served yet
    READY = "ready"
    STOPPED = "stopped"  # shut down on request (a drain, the end of a test)
    FAILED = "failed"  # the core died or failed to start: `error` says why


class EngineDeadError(RuntimeError):
    """The engine failed or was shut down: no request can be served."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full: retry later."""


class AdapterNotFoundError(KeyError):
    """An adapter operation named an adapter that is not loaded."""


class AdapterConflictError(RuntimeError):
    """An adapter operation clashes with the engine's state (in use, being changed)."""


class EngineClient(Protocol):
    tokenizer: Tokenizer
    info: EngineInfo | None  # set once the model is loaded
    inputs: InputProcessor | None  # the prompt checks against that model, set with `info`
    stats: CoreStats | None  # the core's last report
    error: str | None  # why it failed or stopped
    adapters: dict[str, str]  # loaded LoRA adapters: name -> path

    @property
    def state(self) -> EngineState: ...

    @property
    def num_unfinished(self) -> int: ...

    def stalled_for(self) -> float:
        """Seconds the core has had work without reporting a step (0 while idle): health's heartbeat."""
        ...

    async def wait_ready(self) -> None: ...

    # generate(prompt, params=None, request_id=None, *, cache_salt=None, max_cached_tokens=None, lora=None,
    # priority=None, replayable=False): the request's outputs as they grow (see AsyncEngine.generate).
    generate: Callable[..., AsyncIterator[RequestOutput]]

    def abort(self, request_id: str) -> None: ...

    def abort_all(self) -> None: ...

    async def add_lora(self, name: str, path: str) -> None: ...

    async def remove_lora(self, name: str) -> None: ...

    def shutdown(self) -> None: ...
