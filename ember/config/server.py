"""What `ember serve` adds around the engine: the HTTP listener, keys, adapters at start, drain."""

from __future__ import annotations

from dataclasses import dataclass

from ember.config.schema import check, setting


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
    allow_unknown_fields: bool = setting(
        False,
        help="ignore request fields this server does not know (default: a 400 naming the field, as OpenAI "
        "answers); for clients that send extras of their own",
    )
    log_level: str = setting("info", help="log verbosity", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        check(self)
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
