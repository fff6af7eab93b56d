"""DeploymentSpec: everything `ember serve` runs (model, engine, server), as one file.

    model: smollm2-135m-instruct
    engine: {dtype: float32, cache: {kv_cache_memory: 2GiB, ...}, ...}
    server: {port: 8000, ...}

It reads strictly (an unknown key or a bad value is refused, naming the dotted field) and writes every
setting, so a printed spec is the whole of what would run, and reads back equal.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.config.engine import EngineConfig
from ember.config.schema import ConfigError, Leaf, build, leaves, to_plain
from ember.config.server import ServerConfig


@dataclass
class DeploymentSpec:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        # Adapters loaded at start, a key to load them at run time, or fine-tuned ones need the model's LoRA wrappers.
        if (
            self.server.loras or self.server.keys.admin is not None or self.server.fine_tuning
        ) and not self.engine.lora.enabled:
            lora = dataclasses.replace(self.engine.lora, enabled=True)
            self.engine = dataclasses.replace(self.engine, lora=lora)  # a copy: the caller's stays as given

    @property
    def model(self) -> str:
        return self.engine.model

    def to_dict(self, redact: bool = False) -> dict[str, Any]:
        """`redact`: API keys written as '***' (a spec for people to read; it does not load back)."""
        engine = to_plain(self.engine, redact)
        return {"model": engine.pop("model"), "engine": engine, "server": to_plain(self.server, redact)}

    @classmethod
    def from_dict(cls, data: Any) -> DeploymentSpec:
        if not isinstance(data, dict):
            raise ConfigError("spec", f"must be a mapping with model, engine and server (got {data!r})")
        data = dict(data)
        for key in data:
            if key not in ("model", "engine", "server"):
                close = difflib.get_close_matches(str(key), ("model", "engine", "server"), n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ConfigError(str(key), f"unknown setting; {hint}known: model, engine, server")
        engine = data.get("engine", {})
        if isinstance(engine, dict) and "model" in engine:
            raise ConfigError("engine.model", "write the model at the top level of the spec (model: NAME)")
        if isinstance(engine, dict) and "model" in data:
            data["engine"] = {"model": data.pop("model"), **engine}
        try:
            return build(cls, data)
        except ConfigError as exc:  # the model is written at the top level, so name it there
            if exc.field == "engine.model":
                raise ConfigError("model", exc.message) from None
            raise

    def with_settings(self, flat: dict[str, Any]) -> DeploymentSpec:
        """A copy with these flat settings (the CLI's flag names with underscores) replaced."""
        data = self.to_dict()
        known = spec_settings()
        for name, value in flat.items():
            if name not in known:
                raise ConfigError(name, f"unknown setting; known: {', '.join(known)}")
            *parents, last = known[name][0]
            node = data
            for p in parents:
                node = node[p]
            node[last] = value
        return DeploymentSpec.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> DeploymentSpec:
        """Read a .yaml/.yml or .json spec file."""
        text = Path(path).read_text()
        if Path(path).suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(str(path), f"is not valid YAML: {exc}") from None
        return cls.from_dict(data if data is not None else {})

    def dump(self, path: str | Path | None = None, fmt: str | None = None, redact: bool = False) -> str:
        """The spec as YAML (or JSON: fmt='json', or a .json path); written to `path` if one is given;
        `redact`: API keys as '***'."""
        fmt = fmt or ("json" if path is not None and Path(path).suffix.lower() == ".json" else "yaml")
        data = self.to_dict(redact)
        if fmt == "json":
            text = json.dumps(data, indent=2) + "\n"
        elif fmt == "yaml":
            import yaml

            text = yaml.safe_dump(data, sort_keys=False)
        else:
            raise ValueError(f"spec format must be yaml or json (got '{fmt}')")
        if path is not None:
            Path(path).write_text(text)
        return text


def spec_settings() -> dict[str, tuple[tuple[str, ...], Leaf]]:
    """Flat name -> (its path in `to_dict()`'s form, its declaration), for the engine and the server."""
    out: dict[str, tuple[tuple[str, ...], Leaf]] = {}
    for root, cls in (("engine", EngineConfig), ("server", ServerConfig)):
        for leaf in leaves(cls):
            path = leaf.path if leaf.path == ("model",) else (root, *leaf.path)
            if leaf.name in out:  # two settings answering to one flag would be a bug in the schema
                raise AssertionError(f"flag {leaf.flag} is declared twice")
            out[leaf.name] = (path, leaf)
    return out
