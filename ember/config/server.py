"""What `ember serve` adds around the engine: the HTTP listener, keys, adapters at start, drain."""

from __future__ import annotations

from dataclasses import dataclass

from ember.config.schema import ConfigError, check, setting
from ember.config.units import format_bytes, parse_bytes


def parse_loras(specs: list[str]) -> dict[str, str]:
    """['name=path', ...] -> {'name': 'path'}"""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--lora takes NAME=PATH (got '{spec}')")
        if name.strip() in out:
            raise ValueError(f"--lora: '{name.strip()}' is given twice")
        out[name.strip()] = path.strip()
    return out


def parse_namespaces(specs: list[str]) -> dict[str, list[str]]:
    """['team-a=key1,key2', ...] -> {'team-a': ['key1', 'key2']}"""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, keys = spec.partition("=")
        listed = [k.strip() for k in keys.split(",") if k.strip()]
        if not sep or not name.strip() or not listed:
            raise ValueError(f"--cache-namespace takes NAME=KEY1,KEY2,... (got '{spec}')")
        out.setdefault(name.strip(), []).extend(listed)
    return out


@dataclass
class ServerConfig:
    host: str = setting("127.0.0.1", help="the address to listen on")
    port: int = setting(8000, help="the port to listen on", minimum=0)
    served_model_name: str | None = setting(None, help="the name clients use (default: --model)")
    api_keys: list[str] = setting(
        factory=list, help="accepted API key (repeatable); none: the API is open", flag="--api-key"
    )
    # Prefix-cache namespaces shared by several keys: name -> keys (every other key is its own).
    cache_namespaces: dict[str, list[str]] = setting(
        factory=dict,
        help="NAME=KEY1,KEY2: these API keys share one prefix-cache namespace (repeatable); every other "
        "key has its own",
        flag="--cache-namespace",
        parse=parse_namespaces,
    )
    loras: dict[str, str] = setting(
        factory=dict,
        help="NAME=PATH: a PEFT LoRA adapter to serve as model NAME (repeatable); implies --enable-lora",
        flag="--lora-modules",
        aliases=("--lora",),
        parse=parse_loras,
    )
    admin_key: str | None = setting(
        None, help="key for /v1/adapters (runtime adapter loading); implies --enable-lora"
    )
    max_queue: int = setting(
        256, help="requests that may wait beyond --max-num-seqs; past it, 429", minimum=0
    )
    shutdown_timeout: float = setting(
        30.0, help="seconds a SIGTERM drain waits for requests in flight", minimum=0
    )
    embedding_model: str | None = setting("all-minilm-l6-v2", help="served at /v1/embeddings; none to skip")
    engine_mode: str = setting(
        "process",
        help="where the engine core steps: process (measured faster) or thread",
        choices=("process", "thread"),
    )
    log_level: str = setting("info", help="log verbosity", choices=("debug", "info", "warning", "error"))
    # Limits on what one client can make the HTTP process hold (ember.server.middleware, .connections).
    # 16 MiB is far past any valid request: a full 128k-token context as JSON token ids is ~1 MiB, as
    # \u-escaped text ~3 MiB, an embeddings batch of 2048 inputs of 512 token ids ~7 MiB.
    max_request_bytes: int | str = setting(
        "16MiB",
        help="the largest request body accepted (16MiB, 1GiB or bytes); past it, 413",
        show=format_bytes,
    )
    header_timeout: float = setting(
        10.0, help="seconds a connection has to send its request's headers before it is closed", minimum=0.1
    )
    body_timeout: float = setting(
        60.0, help="seconds a request has to send its whole body; past it, 408", minimum=0.1
    )
    # Past max_num_seqs + max_queue (384 by default) the engine refuses requests anyway; the rest is room
    # for probes and idle keep-alive connections, well under the usual 1024 file-descriptor limit.
    max_connections: int = setting(
        512, help="open HTTP connections at most; more are closed at once (and logged)", minimum=1
    )
    health_stall_timeout: float = setting(
        30.0,
        help="/health and /ready answer 503 once the engine has had work but reported no step for this "
        "many seconds",
        minimum=0.1,
    )
    allowed_origins: list[str] = setting(
        factory=list,
        help="CORS: a browser origin allowed to call the API (repeatable or comma-separated; * for any); "
        "none: CORS off",
        flag="--allowed-origins",
    )

    def __post_init__(self) -> None:
        try:
            self.max_request_bytes = parse_bytes(self.max_request_bytes)
        except ValueError as exc:
            raise ConfigError("max_request_bytes", str(exc)) from None
        check(self)
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"must be 0..65535 (got {self.port})")
        if self.max_request_bytes < 1024:
            raise ConfigError("max_request_bytes", f"must be at least 1KiB (got {self.max_request_bytes})")
        self.allowed_origins = [o.strip() for v in self.allowed_origins for o in v.split(",") if o.strip()]
        # The flags are named: these settings come from the command line far more often than from a file.
        if any(not k.strip() for k in self.api_keys):
            raise ValueError("--api-key must not be empty")
        if self.admin_key is not None and (not self.admin_key.strip() or self.admin_key in self.api_keys):
            raise ValueError("--admin-key must be non-empty and differ from every --api-key")
        seen: dict[str, str] = {}
        for name, keys in self.cache_namespaces.items():
            for key in keys:
                if key not in self.api_keys:
                    raise ValueError(f"--cache-namespace {name}: '{key}' is not one of the --api-key values")
                if key in seen:
                    raise ValueError(f"--cache-namespace: key '{key}' is in both {seen[key]} and {name}")
                seen[key] = name

    # The parsers, where callers of the old ServeOptions find them.
    parse_loras = staticmethod(parse_loras)
    parse_namespaces = staticmethod(parse_namespaces)
