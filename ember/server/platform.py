"""The platform behind the routes beyond inference: one store (ember.store: a database and a directory of
uploaded files) shared by files, stored completions, responses, batches, evals, aliases and fine-tuning
jobs; the background services that work on it; and `call`, the way those services run an API request
inside the server (a batch line, an eval sample, a relabelling) without HTTP and without the caller's key.

A feature is a module with `install(app, ctx: PlatformContext)`; its routes' access is declared in its
`ACCESS` (route template -> "user", "user_or_admin" or "admin"; a route not listed takes an API key).
`FEATURES` names them; create_app installs each that exists when the server has a store.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ember.store.db import Store
from ember.store.files import FileStore

# The platform's feature modules, in install order; a name that does not exist (yet) is skipped.
FEATURES = (
    "ember.server.traces_api",  # stored chat completions and feedback (the flywheel's capture)
    "ember.server.aliases_api",  # deployment aliases: a stable model name -> base + adapter version
    "ember.server.evals_api",  # /v1/evals and their runs
    "ember.server.flywheel_api",  # traffic -> dataset -> tune -> eval -> promote
    "ember.server.responses_api",  # /v1/responses and the server-side tool loop
    "ember.server.batches_api",  # /v1/batches over /v1/files
    "ember.server.keys_api",  # /v1/keys: virtual keys (and the usage writer)
    "ember.server.usage_api",  # /v1/usage: metered usage, JSON or CSV
)
# Route prefixes the store serves: without one (--no-store) they answer 404 not_enabled.
STORE_PREFIXES = (
    "/v1/files",
    "/v1/responses",
    "/v1/batches",
    "/v1/evals",
    "/v1/aliases",
    "/v1/flywheel",
    "/v1/keys",
    "/v1/usage",
)

INTERACTIVE_PRIORITY = 0  # the engine serves lower numbers first
BATCH_PRIORITY = 10


class Service(Protocol):
    """Background work started and stopped with the app (a job runner, a trace writer)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Platform:
    """The store of one server (ServerState.platform)."""

    root: Path  # the data directory: files/, adapters/, ...
    store: Store
    blobs: FileStore
    max_upload_bytes: int

    @classmethod
    def open(cls, root: str | Path, database_url: str, max_upload_bytes: int) -> Platform:
        root = Path(root)
        return cls(root, Store(database_url), FileStore(root / "files"), max_upload_bytes)


@dataclass
class CallResult:
    """The answer to an API request run inside the server: the status and the body a client would have
    got over HTTP (an error body in OpenAI's shape for a 4xx or 5xx)."""

    status: int
    body: dict

    @property
    def ok(self) -> bool:
        return self.status == 200


# (path, body as JSON, tenant, priority) -> the answer. Non-streamed only: `stream` is refused.
Caller = Callable[[str, dict, "str | None", int], Awaitable[CallResult]]


@dataclass
class PlatformContext:
    """What a feature's `install` gets: the server's parts it may build on."""

    state: Any  # ember.server.app.ServerState
    engine: Any  # the AsyncEngine (adapters: engine.adapters, add_lora, remove_lora)
    backend: Any  # ember.server.backend.EngineBackend
    embeddings: Any  # ember.server.backend.EmbeddingBackend, or None
    model_name: str  # the base model's served name
    platform: Platform
    call: Caller  # run an API request inside the server (see ember.server.app._internal_caller)
    # Internal endpoints by path: "/v1/chat/completions", "/v1/completions", "/v1/embeddings" are the
    # server's; a feature adds its own (the Responses API adds "/v1/responses"). Each takes
    # (body dict, tenant, priority) and returns the answer dict, raising the exceptions the routes raise.
    endpoints: dict[str, Callable[[dict, str | None, int], Awaitable[dict]]] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)  # started with the app, stopped in reverse

    def tenant_of(self, request) -> str | None:
        """The owner id of an HTTP request (ServerState.tenant of the key the gate accepted)."""
        return self.state.tenant(getattr(request.state, "api_key", None))

    def is_admin(self, request) -> bool:
        """Whether the request carries the admin key (the gate set request.state.admin)."""
        return bool(getattr(request.state, "admin", False))


def feature_modules() -> list:
    """The FEATURES modules that exist, imported."""
    found = []
    for name in FEATURES:
        if importlib.util.find_spec(name) is not None:
            found.append(importlib.import_module(name))
    return found


def decode(body: bytes) -> dict:
    return json.loads(body) if body else {}
