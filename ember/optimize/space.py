"""The configurations the optimizer may try, read from the config schema (`setting(search=...)`).

A numeric range becomes a few points (geometric for a log range); `--vary NAME=a,b` replaces a field's
values and `--fix NAME=v` holds it. Combinations the EngineConfig refuses (int4 without bfloat16) are
dropped, and a setting that only matters under another (k without a speculative method) is not varied
where it cannot matter, so no two candidates run the same engine.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

from ember.config import EngineConfig
from ember.config.schema import ConfigError, Range, build, leaves, search_space

# What `ember optimize` varies unless told otherwise: the settings that move latency, cost or quality on
# one machine. The rest of the schema's searchable fields may be named with --vary.
DEFAULT_FIELDS = (
    "dtype",
    "quantization",
    "speculative.method",
    "speculative.num_speculative_tokens",
    "scheduler.max_num_seqs",
    "scheduler.max_num_batched_tokens",
    "cache.enable_prefix_caching",
)
LOSSY = ("dtype", "quantization")  # the settings that change what the model computes
# Only meaningful when the speculative method is set.
_NEEDS_SPECULATION = ("speculative.num_speculative_tokens", "speculative.max_batch_tokens")


@dataclass(frozen=True)
class Candidate:
    """One configuration: the varied settings by dotted name (the rest are the base's)."""

    settings: tuple[tuple[str, Any], ...]

    @property
    def key(self) -> str:
        return json.dumps(dict(self.settings), sort_keys=True)

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.settings).get(name, default)

    def engine(self, base: EngineConfig | None = None) -> EngineConfig:
        return engine_with(base or EngineConfig(), dict(self.settings))

    def label(self) -> str:
        short = {"speculative.num_speculative_tokens": "k", "scheduler.max_num_seqs": "seqs"}
        short |= {"scheduler.max_num_batched_tokens": "budget", "cache.enable_prefix_caching": "prefix"}
        return " ".join(f"{short.get(k, k.split('.')[-1])}={_show(v)}" for k, v in self.settings)


def _show(v: Any) -> str:
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def engine_with(base: EngineConfig, settings: dict[str, Any]) -> EngineConfig:
    """`base` with these dotted settings replaced (validated as a spec file would be)."""
    from ember.config.schema import to_plain

    data = to_plain(base)
    for name, value in settings.items():
        *parents, last = name.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[last] = value
    return build(EngineConfig, data)


def points(choice: tuple[Any, ...] | Range, levels: int = 4) -> list[Any]:
    """A field's values to try: its choices, or `levels` points across its range."""
    if not isinstance(choice, Range):
        return list(choice)
    lo, hi = choice.low, choice.high
    if choice.log:
        raw = [lo * (hi / lo) ** (i / (levels - 1)) for i in range(levels)]
        # round to powers of two: the sizes people configure
        return sorted({int(2 ** round(math.log2(v))) for v in raw})
    return sorted({int(round(lo + (hi - lo) * i / (levels - 1))) for i in range(levels)})


def _parse_value(text: str) -> Any:
    t = text.strip()
    if t.lower() in ("none", "null", "off"):
        return None
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for kind in (int, float):
        try:
            return kind(t)
        except ValueError:
            pass
    return t


def space(
    fields: tuple[str, ...] = DEFAULT_FIELDS,
    vary: dict[str, str] | None = None,
    fix: dict[str, str] | None = None,
    levels: int = 4,
) -> dict[str, list[Any]]:
    """Dotted name -> values to try. `vary`: 'a,b,c' per name (any searchable field); `fix`: one value."""
    declared = search_space(EngineConfig)
    known = {leaf.dotted for leaf in leaves(EngineConfig)}
    out = {name: points(declared[name], levels) for name in fields}
    for name, text in (vary or {}).items():
        if name not in known:
            raise ConfigError(name, f"unknown setting; searchable: {', '.join(declared)}")
        out[name] = [_parse_value(v) for v in text.split(",")]
    for name, text in (fix or {}).items():
        if name not in known:
            raise ConfigError(name, f"unknown setting; searchable: {', '.join(declared)}")
        out[name] = [_parse_value(text)]
    return out


def held(values: dict[str, list[Any]], base: EngineConfig) -> EngineConfig:
    """`base` with the settings given one value each: the engine every candidate starts from."""
    return engine_with(base, {n: v[0] for n, v in values.items() if len(v) == 1})


def default(values: dict[str, list[Any]], base: EngineConfig) -> Candidate:
    """`base` itself, as a candidate over the engine `held` makes: what `ember serve` would run with no
    flags, which the pick must beat."""
    from ember.config.schema import to_plain

    plain = to_plain(base)

    def value(name: str) -> Any:
        node: Any = plain
        for part in name.split("."):
            node = node[part]
        return node

    return Candidate(tuple((n, value(n)) for n, v in values.items() if len(v) == 1))


def candidates(values: dict[str, list[Any]], base: EngineConfig | None = None) -> list[Candidate]:
    """Every valid combination of the settings given several values (apply the others with `held`),
    each engine once."""
    base = base or EngineConfig()
    names = [n for n, v in values.items() if len(v) > 1]
    seen: set[str] = set()
    out = []
    for combo in itertools.product(*(values[n] for n in names)):
        settings = dict(zip(names, combo, strict=True))
        if settings.get("speculative.method", base.speculative.method) is None:
            for n in _NEEDS_SPECULATION:
                settings.pop(n, None)  # the base's value: it cannot matter
        try:
            engine_with(base, settings)
        except ConfigError:
            continue
        c = Candidate(tuple(settings.items()))
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def lossless(candidate: Candidate, base: EngineConfig | None = None) -> bool:
    """Whether this config computes what the float32 unquantized model does (no quality to measure)."""
    engine = candidate.engine(base)
    return engine.dtype == "float32" and engine.quantization is None
