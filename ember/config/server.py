"""What `ember serve` adds around the engine: the HTTP listener, keys, adapters at start, drain.

API keys come from the flags, from files (`--api-key-file`, `--admin-key-file`: one key a line, '#'
comments) and from the environment (`EMBER_API_KEYS`, comma-separated; `EMBER_ADMIN_KEY`), so that no key
need be on a command line, where `ps` shows it. `ServerConfig.keys` is what the server accepts: every API
key from every source; the admin key from the flag, else its file, else the environment.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ember.config.schema import REDACTED, ConfigError, check, setting
from ember.config.units import format_bytes, parse_bytes
from ember.paths import ember_adapter_dir, ember_data_dir

API_KEYS_ENV = "EMBER_API_KEYS"
ADMIN_KEY_ENV = "EMBER_ADMIN_KEY"
PROVIDER_KINDS = ("openai", "ember")
PROVIDER_FORM = "NAME=URL[,key_env=VAR][,kind=openai|ember]"


@dataclass(frozen=True)
class Keys:
    api: list[str]  # the accepted API keys; none: the API is open
    admin: str | None  # the key of /v1/adapters and /metrics; None: no admin


def read_key_file(path: str, flag: str) -> list[str]:
    """The keys of a key file: one a line; blank lines and lines starting with '#' are skipped."""
    try:
        text = Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(f"{flag} {path}: cannot read it ({why})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


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


MCP_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class McpServer:
    """One operator-configured MCP server: a command run over stdio, or a Streamable HTTP endpoint."""

    label: str  # what requests name it by: {"type": "mcp", "server_label": label}
    command: tuple[str, ...] = ()  # stdio: the program and its arguments
    url: str | None = None  # Streamable HTTP: http(s)://host[:port]/path

    @classmethod
    def parse(cls, label: str, target: str) -> McpServer:
        """`calc`, `stdio:python -m calc` / `http://host:port/mcp` -> the server; ValueError naming the fault."""
        spec = f"--mcp {label}={target}"
        if not MCP_LABEL.match(label):
            raise ValueError(
                f"{spec}: the label must start with a letter and hold only letters, digits, '_' and '-' "
                "(64 at most)"
            )
        scheme, sep, rest = target.partition(":")
        scheme = scheme.strip().lower()
        if sep and scheme == "stdio":
            try:
                command = tuple(shlex.split(rest))
            except ValueError as exc:
                raise ValueError(f"{spec}: cannot split the command ({exc})") from None
            if not command:
                raise ValueError(f"{spec}: stdio: needs a command, e.g. stdio:python -m my_server")
            return cls(label, command=command)
        if sep and scheme in ("http", "https"):
            url = target.strip()
            if not urlsplit(url).hostname:
                raise ValueError(f"{spec}: the URL has no host (e.g. http://127.0.0.1:8001/mcp)")
            return cls(label, url=url)
        named = f"unknown scheme '{scheme}'" if sep else "no scheme"
        raise ValueError(f"{spec}: {named}; use stdio:COMMAND ARGS or http(s)://HOST/PATH")


def parse_mcp(specs: list[str]) -> dict[str, str]:
    """['calc=stdio:python -m calc', 'kv=http://h/mcp'] -> {'calc': 'stdio:...', 'kv': 'http://h/mcp'},
    each checked (McpServer.parse)."""
    out: dict[str, str] = {}
    for spec in specs:
        label, sep, target = spec.partition("=")
        label = label.strip()
        if not sep or not label or not target.strip():
            raise ValueError(f"--mcp takes LABEL=stdio:COMMAND or LABEL=http(s)://URL (got '{spec}')")
        if label in out:
            raise ValueError(f"--mcp: the label '{label}' is given twice")
        McpServer.parse(label, target)
        out[label] = target.strip()
    return out


@dataclass(frozen=True)
class ProviderSpec:
    """An OpenAI-compatible upstream (--provider): its models are served as NAME/model. The key is read
    from the environment variable `key_env` when the server starts, so it is never on a command line or
    in a spec file; `kind` ember: the upstream is an ember server and takes ember's own request fields."""

    name: str
    url: str  # the API root, up to and including /v1
    key_env: str
    kind: str = "openai"


def default_key_env(name: str) -> str:
    """EMBER_PROVIDER_<NAME>_KEY, the name upper-cased and anything but letters and digits made '_'."""
    return "EMBER_PROVIDER_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper() + "_KEY"


def parse_provider(spec: str) -> ProviderSpec:
    """'up=http://host:8001/v1,key_env=UP_KEY,kind=ember' -> ProviderSpec."""
    name, sep, rest = spec.partition("=")
    url, *options = [p.strip() for p in rest.split(",")]
    name = name.strip()
    if not sep or not url:
        raise ValueError(f"--provider takes {PROVIDER_FORM} (got '{spec}')")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"--provider {spec}: NAME must be letters, digits, '_', '.' or '-' (got '{name}')")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--provider {name}: the URL must start with http:// or https:// (got '{url}')")
    given: dict[str, str] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if key not in ("key_env", "kind") or not eq or not value:
            raise ValueError(f"--provider {name}: unknown option '{option}'; it takes {PROVIDER_FORM}")
        given[key] = value
    kind = given.get("kind", "openai")
    if kind not in PROVIDER_KINDS:
        raise ValueError(f"--provider {name}: kind must be openai or ember (got '{kind}')")
    return ProviderSpec(name, url.rstrip("/"), given.get("key_env", default_key_env(name)), kind)


def parse_pipelines(specs: list[str]) -> dict[str, str]:
    """['support=support.yaml', ...] -> {'support': 'support.yaml'} (the files are read when the config is
    made: ServerConfig.pipeline_specs)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--pipeline takes NAME=SPEC.yaml (got '{spec}')")
        if name in out:
            raise ValueError(f"--pipeline: '{name}' is given twice")
        out[name] = path
    return out


def parse_fallbacks(specs: list[str]) -> dict[str, list[str]]:
    """['m=up/m2,local', ...] -> {'m': ['up/m2', 'local']}"""
    out: dict[str, list[str]] = {}
    for spec in specs:
        model, sep, targets = spec.partition("=")
        listed = [t.strip() for t in targets.split(",") if t.strip()]
        if not sep or not model.strip() or not listed:
            raise ValueError(f"--fallback takes MODEL=TARGET1[,TARGET2...] (got '{spec}')")
        if model.strip() in listed:
            raise ValueError(f"--fallback {spec}: '{model.strip()}' cannot fall back to itself")
        out.setdefault(model.strip(), []).extend(listed)
    return out


@dataclass
class ServerConfig:
    host: str = setting("127.0.0.1", help="the address to listen on")
    port: int = setting(8000, help="the port to listen on", minimum=0)
    served_model_name: str | None = setting(None, help="the name clients use (default: --model)")
    api_keys: list[str] = setting(
        factory=list,
        help=f"accepted API key (repeatable; visible in ps: prefer --api-key-file or ${API_KEYS_ENV}); none "
        "anywhere: the API is open",
        flag="--api-key",
        secret=True,
    )
    api_key_file: str | None = setting(None, help="a file of accepted API keys, one a line")
    # Prefix-cache namespaces shared by several keys: name -> keys (every other key is its own).
    cache_namespaces: dict[str, list[str]] = setting(
        factory=dict,
        help="NAME=KEY1,KEY2: these API keys share one prefix-cache namespace (repeatable); every other "
        "key has its own",
        flag="--cache-namespace",
        parse=parse_namespaces,
        secret=True,
    )
    loras: dict[str, str] = setting(
        factory=dict,
        help="NAME=PATH: a PEFT LoRA adapter to serve as model NAME (repeatable); implies --enable-lora",
        flag="--lora-modules",
        aliases=("--lora",),
        parse=parse_loras,
    )
    admin_key: str | None = setting(
        None,
        help=f"key for /v1/adapters (runtime adapter loading) and /metrics; implies --enable-lora (prefer "
        f"--admin-key-file or ${ADMIN_KEY_ENV})",
        secret=True,
    )
    admin_key_file: str | None = setting(None, help="a file holding the admin key")
    lora_roots: list[str] = setting(
        factory=list,
        help="a directory POST /v1/adapters may load adapters from (repeatable); ember's adapter directory "
        "and each --lora adapter are roots too",
        flag="--lora-root",
    )
    metrics_public: bool = setting(
        False, help="serve /metrics to anyone, without a key (default: the admin key only, once keys are set)"
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
    # The store of files and fine-tuning jobs (ember.store): an embedded SQLite database by default.
    data_dir: str | None = setting(
        None,
        help="where uploaded files, fine-tuning jobs and their adapters live (default: ember's data dir)",
    )
    database_url: str | None = setting(
        None,
        help="the store's database: sqlite:///PATH or postgresql://... (default: SQLite under --data-dir)",
        secret=True,
    )
    store: bool = setting(
        True,
        help="keep a store (a database and a file directory under --data-dir): /v1/files, stored responses "
        "and completions, batches, evals; off: those routes answer 404 not_enabled",
    )
    # Stored chat completions (ember.traces): captured in memory, written in batches off the request path.
    store_traces: bool = setting(
        False,
        help="store every chat completion as a trace (a request opts out with store: false; without this, "
        "only requests with store: true are stored); needs --store",
    )
    trace_retention: str = setting(
        "30d",
        help="how long traces are kept: an age (30d, 12h), a row count over all keys (1000000rows), both "
        "(30d,1000000rows) or off; the writer deletes the rest",
    )
    trace_redact: list[str] = setting(
        factory=list,
        help="a regex blanked out of traces before they are written (repeatable), next to the built-in "
        "e-mail, phone, card-number and API-key patterns; 'off' drops the built-ins",
        flag="--trace-redact",
    )
    trace_flush_ms: int = setting(
        200, help="the longest a captured trace waits in memory before it is written", minimum=1
    )
    trace_queue: int = setting(
        10000, help="traces held in memory at most; past it new ones are dropped (and counted)", minimum=1
    )
    prices: str | None = setting(
        None,
        help="a JSON or YAML price table (USD per million input, cached input and output tokens per model, "
        "a batch discount) that usage is costed and money budgets are charged by; none: tokens are free",
    )
    max_upload_bytes: int | str = setting(
        "512MiB",
        help="the largest file /v1/files accepts (streamed to disk); past it, 413",
        show=format_bytes,
    )
    fine_tuning: bool = setting(
        False,
        help="serve /v1/fine_tuning, training in a worker process (implies --enable-lora, to "
        "serve what is tuned; off: a 404 that says how to turn it on)",
    )
    max_tuning_jobs: int = setting(1, help="fine-tuning jobs that train at once", minimum=1)
    # MCP servers the Responses API's server-side tool loop may call (ember.responses.mcp).
    mcp_servers: dict[str, str] = setting(
        factory=dict,
        help="LABEL=stdio:COMMAND ARGS or LABEL=http(s)://URL: an MCP server that /v1/responses offers as "
        '{"type": "mcp", "server_label": LABEL} tools, run by the server itself (repeatable); needs --store',
        flag="--mcp",
        parse=parse_mcp,
    )
    mcp_timeout: float = setting(
        30.0,
        help="seconds one MCP tool call may take (waiting for its server to start included); past it the "
        "model reads an error and the server's session is restarted",
        minimum=0.1,
    )
    mcp_max_output: int | str = setting(
        "64KiB",
        help="the most of one MCP tool result the model reads (bytes of text, e.g. 64KiB); the rest is cut, "
        "and the cut is said in the result",
        show=format_bytes,
    )
    # The gateway (ember.gateway): other OpenAI-compatible servers' models, and where a model's requests go
    # when it fails.
    providers: list[str] = setting(
        factory=list,
        help=f"{PROVIDER_FORM}: serve an OpenAI-compatible server's models as NAME/model (repeatable); its "
        "key from $VAR (default EMBER_PROVIDER_<NAME>_KEY; unset: no key); kind ember: the upstream takes "
        "ember's own fields",
        flag="--provider",
    )
    fallbacks: dict[str, list[str]] = setting(
        factory=dict,
        help="MODEL=TARGET1[,TARGET2...]: where MODEL's requests go, in order, when it fails (5xx, 429, a "
        "timeout, no connection, context too long); a target is NAME/model of a --provider or a local model "
        "(repeatable)",
        flag="--fallback",
        parse=parse_fallbacks,
    )
    provider_timeout: float = setting(
        60.0, help="seconds a provider has to answer (each streamed chunk too) before a retry", minimum=0.1
    )
    provider_retries: int = setting(
        2, help="retries of a failed provider call (with exponential back-off) before its fallback", minimum=0
    )
    provider_cooldown: float = setting(
        30.0,
        help="seconds a provider that keeps failing is skipped before one request probes it again",
        minimum=0.0,
    )
    provider_failures: int = setting(
        3, help="consecutive failed calls after which a provider cools down", minimum=1
    )
    # Compound AI pipelines (ember.pipelines), each served as a model under its name.
    pipelines: dict[str, str] = setting(
        factory=dict,
        help="NAME=SPEC.yaml: serve the pipeline of SPEC.yaml (steps of models, adapters, tools, routes, "
        "checks) as the model NAME (repeatable)",
        flag="--pipeline",
        parse=parse_pipelines,
    )
    allowed_origins: list[str] = setting(
        factory=list,
        help="CORS: a browser origin allowed to call the API (repeatable or comma-separated; * for any); "
        "none: CORS off",
        flag="--allowed-origins",
    )

    ray: bool = setting(
        False,
        help="serve on Ray Serve: replicas of the engine behind a prefix- and adapter-aware router "
        "(needs the extra: pip install 'ember[ray]')",
    )
    replicas: int = setting(1, help="--ray: engine replicas (a fixed number)", minimum=1)
    autoscale: str | None = setting(
        None,
        help="--ray: MIN:MAX replicas, scaled on the requests each one has in flight",
        metavar="MIN:MAX",
    )
    autoscale_target: float = setting(
        2.0, help="--autoscale: requests in flight per replica that the autoscaler aims at", minimum=0.1
    )
    ray_address: str | None = setting(
        None, help="--ray: the Ray cluster to join (ray://host:10001 or host:6379); none: start one here"
    )
    replica_threads: int = setting(1, help="--ray: torch threads in each replica", minimum=1)

    def autoscale_range(self) -> tuple[int, int] | None:
        """--autoscale as (min, max) replicas; None: a fixed --replicas."""
        if self.autoscale is None:
            return None
        low, sep, high = self.autoscale.partition(":")
        if not sep or not low.strip().isdigit() or not high.strip().isdigit():
            raise ConfigError("autoscale", f"takes MIN:MAX replicas, e.g. 1:4 (got {self.autoscale!r})")
        lo, hi = int(low), int(high)
        if not 1 <= lo <= hi:
            raise ConfigError("autoscale", f"needs 1 <= MIN <= MAX (got {self.autoscale!r})")
        return lo, hi

    def __post_init__(self) -> None:
        try:
            self.max_request_bytes = parse_bytes(self.max_request_bytes)
        except ValueError as exc:
            raise ConfigError("max_request_bytes", str(exc)) from None
        try:
            self.max_upload_bytes = parse_bytes(self.max_upload_bytes)
        except ValueError as exc:
            raise ConfigError("max_upload_bytes", str(exc)) from None
        try:
            self.mcp_max_output = parse_bytes(self.mcp_max_output)
        except ValueError as exc:
            raise ConfigError("mcp_max_output", str(exc)) from None
        if self.database_url is not None and not self.database_url.startswith(
            ("sqlite://", "postgresql://", "postgresql+")
        ):
            raise ConfigError(
                "database_url", f"must be sqlite:///PATH or postgresql://... (got {self.database_url!r})"
            )
        check(self)
        if self.fine_tuning and not self.store:
            raise ConfigError("fine_tuning", "needs the store (--store): jobs and their files live in it")
        if self.store_traces and not self.store:
            raise ConfigError("store_traces", "needs the store (--store): traces are kept in its database")
        try:
            self._mcp = [McpServer.parse(label, target) for label, target in self.mcp_servers.items()]
        except ValueError as exc:
            raise ConfigError("mcp_servers", str(exc)) from None
        if self.mcp_servers and not self.store:
            raise ConfigError(
                "mcp_servers", "needs the store (--store): /v1/responses, which calls them, lives in it"
            )
        if self.mcp_max_output < 256:
            raise ConfigError("mcp_max_output", f"must be at least 256 bytes (got {self.mcp_max_output})")
        try:
            from ember.traces.query import Retention
            from ember.traces.redact import Redactor

            Retention.parse(self.trace_retention)
            Redactor.from_specs(self.trace_redact)
        except ValueError as exc:
            raise ConfigError(
                "trace_retention" if "retention" in str(exc) else "trace_redact", str(exc)
            ) from None
        if self.prices is not None:
            from ember.gateway.usage import PriceTable

            try:
                PriceTable.load(self.prices)
            except (OSError, ValueError) as exc:
                raise ConfigError("prices", f"cannot read {self.prices}: {exc}") from None
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"must be 0..65535 (got {self.port})")
        self.autoscale_range()
        if not self.ray:
            for name, value, default in (
                ("replicas", self.replicas, 1),
                ("autoscale", self.autoscale, None),
                ("ray_address", self.ray_address, None),
            ):
                if value != default:
                    raise ConfigError(name, "needs --ray: replicas run on Ray Serve")
        elif self.autoscale is not None and self.replicas != 1:
            raise ConfigError("replicas", "give --replicas N or --autoscale MIN:MAX, not both")
        elif self.fine_tuning:
            raise ConfigError(
                "fine_tuning", "is not served with --ray yet: its adapters load into one engine"
            )
        if self.max_request_bytes < 1024:
            raise ConfigError("max_request_bytes", f"must be at least 1KiB (got {self.max_request_bytes})")
        self.allowed_origins = [o.strip() for v in self.allowed_origins for o in v.split(",") if o.strip()]
        # The flags are named: these settings come from the command line far more often than from a file.
        if any(not k.strip() for k in self.api_keys):
            raise ValueError("--api-key must not be empty")
        given = [*self.api_keys, self.admin_key, *(k for ks in self.cache_namespaces.values() for k in ks)]
        if REDACTED in given:
            raise ValueError(
                f"an API key reads '{REDACTED}': --print-config hides keys; give them with --api-key-file, "
                f"--admin-key-file or ${API_KEYS_ENV} / ${ADMIN_KEY_ENV}"
            )
        self._providers = self._read_providers()
        self._pipelines = self._read_pipelines()
        self._keys = self._read_keys(os.environ)
        api, admin = self._keys.api, self._keys.admin
        if admin is not None and (not admin.strip() or admin in api):
            raise ValueError("--admin-key must be non-empty and differ from every --api-key")
        seen: dict[str, str] = {}
        for name, keys in self.cache_namespaces.items():
            for key in keys:
                if key not in api:
                    raise ValueError(f"--cache-namespace {name}: '{key}' is not one of the --api-key values")
                if key in seen:
                    raise ValueError(f"--cache-namespace: key '{key}' is in both {seen[key]} and {name}")
                seen[key] = name

    def _read_providers(self) -> dict[str, ProviderSpec]:
        providers: dict[str, ProviderSpec] = {}
        for spec in self.providers:
            try:
                parsed = parse_provider(spec)
            except ValueError as exc:
                raise ConfigError("providers", str(exc)) from None
            if parsed.name in providers:
                raise ConfigError("providers", f"--provider {parsed.name} is given twice")
            providers[parsed.name] = parsed
        return providers

    def _read_pipelines(self) -> dict:
        from ember.pipelines.spec import SpecError, load

        loaded = {}
        for name, path in self.pipelines.items():
            try:
                loaded[name] = load(path, name)
            except SpecError as exc:
                raise ConfigError("pipelines", f"--pipeline {name}={path}: {exc}") from None
        return loaded

    @property
    def pipeline_specs(self) -> dict:
        """The --pipeline specs by name, loaded and checked (ember.pipelines.spec.Pipeline)."""
        return self._pipelines

    @property
    def provider_specs(self) -> dict[str, ProviderSpec]:
        """The --provider upstreams by name, parsed and checked."""
        return self._providers

    @property
    def mcp(self) -> list[McpServer]:
        """The MCP servers of --mcp, parsed."""
        return list(self._mcp)

    @property
    def keys(self) -> Keys:
        """The keys the server accepts, from the flags, the key files and the environment (read when
        this config was made)."""
        return self._keys

    def _read_keys(self, environ) -> Keys:
        api = list(self.api_keys)
        if self.api_key_file is not None:
            api += read_key_file(self.api_key_file, "--api-key-file")
        api += [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        admin = self.admin_key
        if admin is None and self.admin_key_file is not None:
            found = read_key_file(self.admin_key_file, "--admin-key-file")
            if len(found) != 1:
                raise ValueError(f"--admin-key-file {self.admin_key_file}: holds {len(found)} keys, not one")
            admin = found[0]
        if admin is None and environ.get(ADMIN_KEY_ENV, "").strip():
            admin = environ[ADMIN_KEY_ENV].strip()
        return Keys(list(dict.fromkeys(api)), admin)

    def store_dir(self) -> Path:
        """The data directory of the store: --data-dir, else ember's."""
        return Path(self.data_dir).expanduser() if self.data_dir else ember_data_dir()

    def store_url(self) -> str:
        """The store's database URL: --database-url, else SQLite in the data directory."""
        return self.database_url or f"sqlite:///{self.store_dir() / 'ember.db'}"

    def adapter_roots(self) -> list[str]:
        """Where runtime adapter loads may read: --lora-root, ember's adapter directory, each --lora."""
        roots = [*self.lora_roots, str(ember_adapter_dir()), *self.loras.values()]
        return list(dict.fromkeys(os.path.realpath(os.path.expanduser(r)) for r in roots))

    # The parsers, where callers of the old ServeOptions find them.
    parse_loras = staticmethod(parse_loras)
    parse_namespaces = staticmethod(parse_namespaces)
