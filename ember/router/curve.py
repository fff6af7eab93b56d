"""The cost/quality curve of a router over its threshold, against random routing at the same cost.

Each threshold routes every held-out input (`model.route`) and scores the choice with the grade the chosen
candidate really got and the cost it really incurred. Random routing sends each input to a candidate drawn
at random with fixed odds; mixing odds, it reaches exactly the segments between the single candidates'
(cost, quality) points, so its best quality at a cost is their upper concave hull. A router dominates random
when none of its points lies below that hull; between two of its points it can mix the two thresholds at
random, so the segment between them is reachable too, and points above a concave curve keep their segments
above it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ember.router.model import route

THRESHOLD_QUANTILES = 41  # curve points from the spread of the predictions, plus 0 and 1


@dataclass(frozen=True)
class Point:
    threshold: float
    cost: float  # mean USD per request
    quality: float  # mean score of the chosen candidates
    shares: list[float]  # fraction of requests sent to each candidate, cheapest first

    def to_dict(self) -> dict:
        return asdict(self)


def thresholds(probs: np.ndarray) -> list[float]:
    """0, 1, the quantiles of the predictions and the midpoints between them: a routing changes only where
    the threshold crosses a prediction, and a midpoint separates predictions that sit on a few values."""
    ts = sorted({0.0, 1.0, *(float(q) for q in np.quantile(probs, np.linspace(0, 1, THRESHOLD_QUANTILES)))})
    return sorted({*ts, *((a + b) / 2 for a, b in zip(ts[:-1], ts[1:], strict=True))})


def router_curve(probs: np.ndarray, scores: np.ndarray, costs: np.ndarray) -> list[Point]:
    """probs, scores, costs: [n, k] with columns cheapest first -> one Point per threshold, cost ascending."""
    n, k = probs.shape
    points = []
    for t in thresholds(probs):
        chosen = route(probs, t)
        rows = np.arange(n)
        shares = np.bincount(chosen, minlength=k) / n
        points.append(
            Point(t, float(costs[rows, chosen].mean()), float(scores[rows, chosen].mean()), shares.tolist())
        )
    return points


def single_points(scores: np.ndarray, costs: np.ndarray) -> list[tuple[float, float]]:
    """(mean cost, mean quality) of sending everything to each candidate."""
    return [(float(c), float(q)) for c, q in zip(costs.mean(axis=0), scores.mean(axis=0), strict=True)]


def random_quality(singles: list[tuple[float, float]], cost: float) -> float:
    """The best quality random routing among the candidates gets at `cost` (their upper concave hull)."""
    pts = sorted(singles)
    hull: list[tuple[float, float]] = []
    for p in pts:
        # Monotone chain, upper side: drop the last point while it lies on or below the chord to p.
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    xs, ys = [p[0] for p in hull], [p[1] for p in hull]
    return float(np.interp(cost, xs, ys))


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def compare(probs: np.ndarray, scores: np.ndarray, costs: np.ndarray, tol: float = 1e-9) -> dict:
    """The curve, random routing's quality at each of its costs, and whether the router dominates."""
    singles = single_points(scores, costs)
    points = router_curve(probs, scores, costs)
    rows = []
    for p in points:
        rand = random_quality(singles, p.cost)
        rows.append({**p.to_dict(), "random_quality": rand, "gain": p.quality - rand})
    gains = [r["gain"] for r in rows]
    return {
        "points": rows,
        "singles": [{"cost": c, "quality": q} for c, q in singles],
        "dominates": all(g >= -tol for g in gains),
        "min_gain": min(gains),
        "mean_gain": float(np.mean(gains)),
    }


def plot(comparison: dict, names: list[str], path: str, title: str = "router vs random routing") -> None:
    """The router's points and random routing's hull, cost on x and quality on y, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, singles = comparison["points"], comparison["singles"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot([p["cost"] for p in points], [p["quality"] for p in points], "o-", ms=3, label="learned router")
    ax.plot([p["cost"] for p in points], [p["random_quality"] for p in points], "--", label="random routing")
    for name, s in zip(names, singles, strict=True):
        ax.annotate(name, (s["cost"], s["quality"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.scatter([s["cost"] for s in singles], [s["quality"] for s in singles], c="k", s=18, zorder=3)
    ax.set_xlabel("mean cost per request (USD)")
    ax.set_ylabel("mean quality (score of the chosen answer)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
