"""The schema's vocabulary: `setting(...)` declares a config field once, with everything the CLI, the spec
file, `LLM(**kw)` and the optimizer need to know about it; the helpers here read those declarations.

A config class stays a plain dataclass: its fields are `setting(...)`s or nested config dataclasses
(sections), and its `__post_init__` calls `check(self)` first, then adds the rules that tie fields together.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_NO_DEFAULT: Any = dataclasses.MISSING


class ConfigError(ValueError):
    """A refused setting: `field` is its dotted name (engine.quantization), `message` what to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def within(self, section: str) -> ConfigError:
        """The same refusal, named from an enclosing section: 'quantization' -> 'engine.quantization'."""
        return ConfigError(f"{section}.{self.field}" if section else self.field, self.message)


@dataclass(frozen=True)
class Range:
    """A numeric search range for the optimizer; `log`: sample evenly in log space (sizes, counts)."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Setting:
    help: str
    flag: str | None = None  # the CLI flag; None: '--' + the field name with dashes
    aliases: tuple[str, ...] = ()  # more flags; for a bool, '/--name' is another off switch
    choices: tuple[Any, ...] | None = None  # the allowed values, in the order messages list them
    search: tuple[Any, ...] | Range | None = None  # what the optimizer may try
    minimum: float | None = None
    # For values a flag cannot give directly: the repeated flag's strings -> the value (NAME=PATH pairs).
    parse: Callable[[list[str]], Any] | None = None
    # How the value is written in a spec file, when that reads better than the value itself (2GiB).
    show: Callable[[Any], Any] | None = None
    metavar: str | None = None  # what --help shows for the value; default: the choices
    secret: bool = False  # an API key or the like: written as '***' where a spec is shown (--print-config)


REDACTED = "***"


def setting(
    default: Any = _NO_DEFAULT,
    *,
    help: str,
    factory: Callable[[], Any] | None = None,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    choices: tuple[Any, ...] | None = None,
    search: tuple[Any, ...] | Range | None = None,
    minimum: float | None = None,
    parse: Callable[[list[str]], Any] | None = None,
    show: Callable[[Any], Any] | None = None,
    metavar: str | None = None,
    secret: bool = False,
) -> Any:
    """A dataclass field with its metadata; `factory` for mutable defaults (lists, dicts)."""
    meta = {"setting": Setting(help, flag, aliases, choices, search, minimum, parse, show, metavar, secret)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Leaf:
    """One setting, found by walking a config class: its path from the root and what it declares."""

    path: tuple[str, ...]  # ('cache', 'kv_cache_memory')
    type: Any  # the resolved annotation: int | None, list[str], ...
    setting: Setting
    default: Any

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        return self.setting.flag or "--" + self.path[-1].replace("_", "-")

    @property
    def name(self) -> str:
        """The flat name: the flag with underscores, as `LLM(**kw)` and the CLI's parameters take it."""
        return self.flag.removeprefix("--").replace("-", "_")


def sections(cls: type) -> dict[str, type]:
    """The nested config dataclasses of `cls`, by field name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """Every setting of `cls` and its sections, depth first, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: list[Leaf] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaves(hints[f.name], (*prefix, f.name))
        elif "setting" in f.metadata:
            default = f.default_factory() if f.default_factory is not _NO_DEFAULT else f.default
            out.append(Leaf((*prefix, f.name), hints[f.name], f.metadata["setting"], default))
    return out


def search_space(cls: type) -> dict[str, tuple[Any, ...] | Range]:
    """What the optimizer may vary, by dotted field name (cache.block_size -> (8, 16, 32))."""
    return {leaf.dotted: leaf.setting.search for leaf in leaves(cls) if leaf.setting.search is not None}


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _conforms(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp in (int, float):  # a bool is an int to Python, never to a config file
        return isinstance(value, int | float if tp is float else int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()
        )
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "none"}
    if tp in names:
        return names[tp]
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return f"a mapping of names to {_describe(args[1]).removeprefix('a ').removeprefix('an ')}s"
    return getattr(tp, "__name__", str(tp))


def choices_text(choices: tuple[Any, ...]) -> str:
    shown = ["none" if c is None else str(c).lower() if isinstance(c, bool) else str(c) for c in choices]
    return ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else shown[0]


def check(obj: Any) -> None:
    """Check each setting of `obj` against its declaration: type, allowed values, minimum. 'none' reads
    as None for a setting that may be None (as a flag must write it). Sections check themselves."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        s: Setting | None = f.metadata.get("setting")
        if s is None:
            continue
        value, tp = getattr(obj, f.name), hints[f.name]
        if _optional(tp) and isinstance(value, str) and value.strip().lower() in ("", "none"):
            value = None
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, tuple) and typing.get_origin(tp) is list:
            value = list(value)
        setattr(obj, f.name, value)
        if not _conforms(value, tp):
            raise ConfigError(f.name, f"must be {_describe(tp)} (got {value!r})")
        if s.choices is not None and value not in s.choices:
            raise ConfigError(f.name, f"must be {choices_text(s.choices)} (got {value!r})")
        if s.minimum is not None and value is not None and value < s.minimum:
            raise ConfigError(f.name, f"must be at least {s.minimum:g} (got {value})")


def to_plain(obj: Any, redact: bool = False) -> dict[str, Any]:
    """A config object -> plain dicts, lists and scalars, as a spec file holds them; `redact`: secrets
    (each key of a list, each value of a mapping's lists) written as '***'."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        s: Setting | None = f.metadata.get("setting")
        if dataclasses.is_dataclass(value):
            out[f.name] = to_plain(value, redact)
        elif redact and s is not None and s.secret and value is not None:
            out[f.name] = _redacted(value)
        elif s is not None and s.show is not None and value is not None:
            out[f.name] = s.show(value)
        else:
            out[f.name] = _copy(value)
    return out


def _redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [REDACTED for _ in value]
    return REDACTED


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value


def build(cls: type, data: Any, where: str = "") -> Any:
    """Plain dicts -> a config object, strictly: an unknown key is refused with the close matches, and
    every refusal names the dotted field it is about."""
    if not isinstance(data, dict):
        raise ConfigError(where or cls.__name__, f"must be a mapping of settings (got {data!r})")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ConfigError(_join(where, str(key)), f"unknown setting; {hint}known: {', '.join(names)}")
    subs = sections(cls)
    kwargs = {
        k: build(subs[k], v, _join(where, k)) if k in subs and not isinstance(v, subs[k]) else v
        for k, v in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise exc.within(where) from None
    except ValueError as exc:
        raise ConfigError(where or cls.__name__, str(exc)) from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
