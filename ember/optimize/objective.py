"""The objective: constraints over the three axes and one goal, parsed from a line a user can type.

    ttft_p95<=800ms, tpot_p95<=60ms, quality>=0.98, minimize cost
    maximize goodput

Latency constraints are also the per-request SLOs that goodput counts against (DistServe: a request is
good when its TTFT and its TPOT each meet theirs), so `ttft_p95<=800ms` means both "95% of requests
start within 800 ms" and "a request that starts later is not good".
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field

# metric -> (unit, what it is, better when). Latencies are held in milliseconds.
METRICS: dict[str, tuple[str, str, str]] = {
    "ttft_p50": ("ms", "median time to first token", "lower"),
    "ttft_p95": ("ms", "95th percentile time to first token", "lower"),
    "tpot_p50": ("ms", "median time per output token after the first", "lower"),
    "tpot_p95": ("ms", "95th percentile time per output token", "lower"),
    "goodput": ("req/s", "requests per second meeting every latency SLO", "higher"),
    "throughput": ("tok/s", "output tokens per second", "higher"),
    "cost": ("$/Mtok", "machine cost per million output tokens, at goodput", "lower"),
    "quality": ("", "greedy token agreement with the reference (or the eval's score)", "higher"),
}
_CONSTRAINT = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>|=)\s*([0-9.eE+-]+)\s*([a-z/%]*)\s*$")
_GOAL = re.compile(r"^\s*(minimize|maximize|min|max)\s+([a-z_0-9]+)\s*$")
_TIME_UNITS = {"ms": 1.0, "s": 1000.0, "": 1.0}


class ObjectiveError(ValueError):
    """An objective that cannot be read; the message names the part and what is known."""


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str  # "<=" or ">="
    value: float

    def holds(self, metrics: dict[str, float]) -> bool:
        v = metrics.get(self.metric)
        if v is None or math.isnan(v):
            return False
        return v <= self.value if self.op == "<=" else v >= self.value

    def violation(self, metrics: dict[str, float]) -> float:
        """How far `metrics` miss this constraint, relative to its bound (0 when it holds)."""
        v = metrics.get(self.metric, math.inf)
        scale = abs(self.value) or 1.0
        miss = v - self.value if self.op == "<=" else self.value - v
        return max(miss, 0.0) / scale

    def __str__(self) -> str:
        unit = METRICS[self.metric][0]
        return f"{self.metric}{self.op}{self.value:g}{unit if unit == 'ms' else ''}"


@dataclass(frozen=True)
class Objective:
    constraints: tuple[Constraint, ...] = ()
    goal: str = "cost"
    maximize: bool = False
    text: str = field(default="", compare=False)

    @property
    def slos_ms(self) -> dict[str, float]:
        """The per-request SLOs goodput counts against: each latency's tightest upper bound."""
        out: dict[str, float] = {}
        for c in self.constraints:
            if c.op == "<=" and c.metric.split("_")[0] in ("ttft", "tpot"):
                key = c.metric.split("_")[0]
                out[key] = min(out.get(key, math.inf), c.value)
        return out

    def feasible(self, metrics: dict[str, float]) -> bool:
        return all(c.holds(metrics) for c in self.constraints)

    def score(self, metrics: dict[str, float]) -> float:
        """Lower is better: the goal's value (negated when maximizing)."""
        v = metrics.get(self.goal, math.nan)
        if math.isnan(v):
            return math.inf
        return -v if self.maximize else v

    def __str__(self) -> str:
        goal = f"{'maximize' if self.maximize else 'minimize'} {self.goal}"
        return ", ".join([*(str(c) for c in self.constraints), goal])


def _known(name: str) -> str:
    close = difflib.get_close_matches(name, METRICS, n=2)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return f"unknown metric '{name}'; {hint}known: {', '.join(METRICS)}"


def parse_objective(text: str) -> Objective:
    """'ttft_p95<=800ms, quality>=0.98, minimize cost' -> an Objective; no goal given: minimize cost."""
    constraints: list[Constraint] = []
    goal: tuple[str, bool] | None = None
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ObjectiveError("the objective is empty; e.g. 'ttft_p95<=800ms, minimize cost'")
    for part in parts:
        if m := _GOAL.match(part.lower()):
            if goal is not None:
                raise ObjectiveError(f"'{part.strip()}': the objective has one goal (minimize or maximize)")
            if m[2] not in METRICS:
                raise ObjectiveError(_known(m[2]))
            goal = (m[2], m[1].startswith("max"))
            continue
        m = _CONSTRAINT.match(part.lower())
        if m is None:
            raise ObjectiveError(
                f"'{part.strip()}' is neither a constraint (metric<=value, e.g. ttft_p95<=800ms) nor a goal "
                "(minimize cost, maximize goodput)"
            )
        name, op, number, unit = m.groups()
        if name not in METRICS:
            raise ObjectiveError(_known(name))
        if op in ("<", ">", "="):
            raise ObjectiveError(f"'{part.strip()}': use <= or >= (a bound is met or not)")
        try:
            value = float(number)
        except ValueError:
            raise ObjectiveError(f"'{part.strip()}': '{number}' is not a number") from None
        if METRICS[name][0] == "ms":
            if unit not in _TIME_UNITS:
                raise ObjectiveError(f"'{part.strip()}': a latency is in ms or s (got '{unit}')")
            value *= _TIME_UNITS[unit]
        elif unit and unit != METRICS[name][0].lower():
            raise ObjectiveError(f"'{part.strip()}': {name} takes no unit '{unit}'")
        constraints.append(Constraint(name, op, value))
    name, maximize = goal or ("cost", False)
    return Objective(tuple(constraints), name, maximize, text)
