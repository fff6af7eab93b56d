"""The search: predict every candidate, then confirm only the most promising with real replays.

1. Every candidate is predicted (the simulator, cheap) and its quality known (lossless: 1.0; lossy:
   measured once per quantization/dtype).
2. Real replays go, within a budget, to the default configuration (what the pick must beat), the best
   predicted feasible candidates, and the predicted Pareto front over (quality, latency, cost).
3. The pick is the best *measured* feasible candidate; predicted and measured numbers, and their error,
   are kept for every measured one.

Everything is written to `state.json` in the output directory as it is learned, so a stopped search
resumes where it was (a result is reused while the workload and the SLOs are the same).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ember.optimize.objective import Objective
from ember.optimize.space import Candidate

LATENCY_AXIS = ("ttft_p95", "tpot_p95", "ttft_p50", "tpot_p50")


@dataclass
class Outcome:
    """What the search found: every candidate's predictions, the measured ones, the pick (None: nothing
    measured is feasible) and why."""

    candidates: list[Candidate]
    predicted: dict[str, dict]
    measured: dict[str, dict]
    front: list[str]  # keys on the predicted Pareto front
    baseline: str  # the key of the default configuration
    pick: str | None
    latency: str  # the front's latency axis
    infeasible: str | None = None  # why nothing is feasible, with the closest config
    calibration: float | None = None  # the step-time factor the baseline's replay gave the predictor
    uncalibrated: dict | None = None  # the baseline's prediction before that
    by_key: dict[str, Candidate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_key = {c.key: c for c in self.candidates}


def latency_axis(objective: Objective) -> str:
    """The latency the front is drawn against: the objective's first latency constraint, else TTFT p95."""
    for c in objective.constraints:
        if c.metric in LATENCY_AXIS:
            return c.metric
    return objective.goal if objective.goal in LATENCY_AXIS else "ttft_p95"


def pareto(points: dict[str, dict], latency: str) -> list[str]:
    """Keys no other point beats on all three of quality (up), `latency` and cost (down)."""

    def axes(m: dict) -> tuple[float, float, float]:
        return (-m.get("quality", 0.0), _num(m.get(latency)), _num(m.get("cost")))

    vals = {k: axes(m) for k, m in points.items()}
    front = []
    for k, a in vals.items():
        if not any(b != a and all(x <= y for x, y in zip(b, a, strict=True)) for b in vals.values()):
            front.append(k)
    return sorted(front, key=lambda k: vals[k])


def _num(v) -> float:
    return math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


class State:
    """state.json: predictions, quality and measurements, keyed by candidate, for one workload and SLOs."""

    def __init__(self, path: Path, scope: str):
        self.path = path
        self.data = {"scope": scope, "predicted": {}, "quality": {}, "measured": {}}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("scope") == scope:
                self.data = saved

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def remember(self, kind: str, key: str, value: dict) -> dict:
        self.data[kind][key] = value
        self.save()
        return value


def search(
    candidates: list[Candidate],
    baseline: Candidate,
    objective: Objective,
    predict: Callable[[Candidate], dict],
    quality: Callable[[Candidate], dict],
    measure: Callable[[Candidate], dict],
    finish: Callable[[dict], dict],
    state: State,
    replays: int,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    calibrate: Callable[[dict, dict], float] | None = None,
) -> Outcome:
    """`predict`/`measure` give latency metrics, `quality` the quality ones, `finish` adds the cost;
    at most `replays` real replays (the baseline's included). `calibrate(predicted, measured)`, given,
    is told the baseline's numbers once it is replayed and returns the factor the predictor now scales
    step times by (the machine's speed at replay time against its profile); every other candidate is
    then predicted again (the baseline too; its first prediction is kept in `uncalibrated`)."""
    if baseline.key not in {c.key for c in candidates}:
        candidates = [baseline, *candidates]
    by_key = {c.key: c for c in candidates}
    for c in candidates:
        if c.key not in state.data["quality"]:
            state.remember("quality", c.key, quality(c))
    predicted = _predict_all(candidates, predict, finish, state, "predicted", progress)
    measured: dict[str, dict] = {}

    def replay(k: str) -> None:
        m = state.data["measured"].get(k) or state.remember("measured", k, measure(by_key[k]))
        measured[k] = finish({**m, **state.data["quality"][k]})

    replay(baseline.key)
    uncalibrated = None
    if calibrate is not None:
        factor = calibrate(predicted[baseline.key], measured[baseline.key])
        state.data["calibration"] = factor
        scope = f"calibrated x{factor:.4g}"
        if state.data.get("calibrated_scope") != scope:
            state.data["calibrated"], state.data["calibrated_scope"] = {}, scope
        uncalibrated = predicted[baseline.key]
        predicted = _predict_all(candidates, predict, finish, state, "calibrated", progress)
    latency = latency_axis(objective)
    front = pareto(predicted, latency)
    feasible = sorted(
        (k for k in predicted if objective.feasible(predicted[k])),
        key=lambda k: objective.score(predicted[k]),
    )
    chosen = []
    for k in feasible + front:  # the best predicted first, then the front's other corners
        if len(chosen) + 1 >= replays:
            break
        if k not in chosen and k != baseline.key:
            chosen.append(k)
    tick = progress("replaying", len(chosen)) if progress else None
    for k in chosen:
        replay(k)
        if tick:
            tick()
    good = sorted(
        (k for k in measured if objective.feasible(measured[k])), key=lambda k: objective.score(measured[k])
    )
    pick = good[0] if good else None
    return Outcome(
        candidates,
        predicted,
        measured,
        front,
        baseline.key,
        pick,
        latency,
        None if pick else explain_infeasible(objective, predicted, measured, by_key),
        state.data.get("calibration") if calibrate is not None else None,
        uncalibrated,
    )


def _predict_all(candidates, predict, finish, state: State, kind: str, progress) -> dict[str, dict]:
    tick = progress(f"{kind}", len(candidates)) if progress else None
    state.data.setdefault(kind, {})
    out = {}
    for c in candidates:
        p = state.data[kind].get(c.key) or state.remember(kind, c.key, predict(c))
        out[c.key] = finish({**p, **state.data["quality"][c.key]})
        if tick:
            tick()
    return out


def explain_infeasible(objective: Objective, predicted: dict, measured: dict, by_key: dict) -> str:
    """Which constraint no configuration meets (measured where measured, else predicted), and the
    configuration that comes closest to meeting them all."""
    seen = {**predicted, **measured}
    lines = []
    for c in objective.constraints:
        if not any(c.holds(m) for m in seen.values()):
            best = min(seen.values(), key=c.violation)
            lines.append(
                f"no configuration meets {c} (the best reaches {c.metric}={best.get(c.metric, math.nan):.3g})"
            )
    if not lines:
        lines.append("each constraint is met by some configuration, but none meets them all together")
    closest = min(seen, key=lambda k: sum(c.violation(seen[k]) for c in objective.constraints))
    where = "measured" if closest in measured else "predicted"
    lines.append(f"closest: {by_key[closest].label() or '(the default)'} ({where})")
    return "; ".join(lines)
