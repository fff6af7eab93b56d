"""The promotion gate: a candidate replaces what an alias serves only if it is better on the primary
criterion with confidence (the lower bound of the paired difference's bootstrap interval is above zero)
and no guard regresses: no other criterion's interval lies entirely below zero, and its median latency is
not more than `max_latency_ratio` times the baseline's.

A comparison here is a plain dict (what the run row stores): {"criteria": [{name, mean_a, mean_b, diff,
ci_low, ci_high, n}], "confidence", "latency_ms": {"a": [...], "b": [...]}}; a is the baseline, b the
candidate.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Gate:
    primary: str | None = None  # the criterion that must improve; None: the first
    max_latency_ratio: float | None = 2.0  # candidate p50 / baseline p50; None: latency is not a guard
    confidence: float = 0.95
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self):
        if self.max_latency_ratio is not None and self.max_latency_ratio < 1.0:
            raise ValueError(f"max_latency_ratio must be at least 1.0 (got {self.max_latency_ratio})")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1) (got {self.confidence})")
        if not 100 <= self.n_boot <= 100_000:
            raise ValueError(f"n_boot must be in [100, 100000] (got {self.n_boot})")

    def as_dict(self) -> dict:
        return asdict(self)


def decide(comparison: dict, gate: Gate) -> dict:
    """{"promote": bool, "checks": [{name, kind, passed, detail}], "reasons": [why not, ...]}."""
    criteria = comparison["criteria"]
    names = [c["name"] for c in criteria]
    primary = gate.primary or names[0]
    checks = []
    for c in criteria:
        if c["diff"] is None:  # every item errored on one side or the other
            kind = "primary" if c["name"] == primary else "guard"
            detail = f"no item was scored on both sides ({c.get('errored')} errored)"
            checks.append({"name": c["name"], "kind": kind, "passed": False, "detail": detail})
            continue
        interval = f"{c['diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
        if c["name"] == primary:
            passed = c["ci_low"] > 0
            detail = f"improvement {interval}: the lower bound must be above 0"
            checks.append({"name": c["name"], "kind": "primary", "passed": passed, "detail": detail})
        else:
            passed = c["ci_high"] >= 0
            detail = f"difference {interval}: the interval must not lie entirely below 0"
            checks.append({"name": c["name"], "kind": "guard", "passed": passed, "detail": detail})
    latency = comparison.get("latency_ms") or {}
    if gate.max_latency_ratio is not None and latency.get("a") and latency.get("b"):
        base, cand = statistics.median(latency["a"]), statistics.median(latency["b"])
        ratio = cand / base if base > 0 else 1.0
        checks.append(
            {
                "name": "latency_p50",
                "kind": "guard",
                "passed": ratio <= gate.max_latency_ratio,
                "detail": f"{cand:.0f} ms vs {base:.0f} ms ({ratio:.2f}x; at most {gate.max_latency_ratio:g}x)",
            }
        )
    reasons = [f"{c['name']}: {c['detail']}" for c in checks if not c["passed"]]
    return {"promote": not reasons, "checks": checks, "reasons": reasons}


def p50(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
