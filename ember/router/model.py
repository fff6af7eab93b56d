"""A learned router: P(good answer) per candidate from the input's features, and the cheapest candidate whose
P(good) reaches a threshold (RouteLLM's rule, generalised from two models to a list ordered by cost).

Where no candidate reaches the threshold the best-predicted one is taken, not the most expensive: a dearer
candidate is not always a better one (on this machine a long few-shot prompt helps some tasks and ruins
others, benchmarks/ROUTER.md). Raising the threshold still never lowers the chosen candidate's cost: the
qualifying set only shrinks while some candidate reaches the threshold, and the best-predicted candidate is
in every set. 0 sends everything to the cheapest candidate, 1 each input to its best-predicted one.

On disk a router is one directory: `router.json` (candidates with their costs, the feature config, the
training report) and `weights.safetensors` (the feature scaler and one logistic head per candidate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from ember.router.features import FeatureConfig, Featurizer

FORMAT = "ember-router/1"
CONFIG_FILE = "router.json"
WEIGHTS_FILE = "weights.safetensors"


class RouterError(ValueError):
    """A router file, examples file or training request that cannot be used; the message says why."""


@dataclass(frozen=True)
class Candidate:
    """A model, adapter or alias a request can be sent to, and what one call to it costs (USD)."""

    name: str
    cost: float


@dataclass
class Heads:
    """The fitted numbers: features are standardised, then one logistic regression per candidate."""

    mean: np.ndarray  # [dim]
    scale: np.ndarray  # [dim]
    coef: np.ndarray  # [num_candidates, dim]
    intercept: np.ndarray  # [num_candidates]

    def probs(self, x: np.ndarray) -> np.ndarray:
        """[n, dim] features -> [n, num_candidates] P(good)."""
        logits = ((x - self.mean) / self.scale) @ self.coef.T + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))


class LearnedRouter:
    """Sends a request to the cheapest candidate predicted to answer it well (see the module docstring)."""

    def __init__(
        self, candidates: list[Candidate], features: FeatureConfig, heads: Heads, report: dict | None = None
    ) -> None:
        if len(candidates) < 2:
            raise RouterError("a router needs at least two candidates")
        if len({c.name for c in candidates}) != len(candidates):
            raise RouterError("candidate names must be distinct")
        # Cheapest first: the order `choose` tries them in. Heads are kept in the same order.
        order = sorted(range(len(candidates)), key=lambda i: (candidates[i].cost, candidates[i].name))
        self._candidates = [candidates[i] for i in order]
        self.features = features
        self.heads = Heads(heads.mean, heads.scale, heads.coef[order], heads.intercept[order])
        self.report = report or {}
        self.featurize = Featurizer(features)

    @property
    def candidates(self) -> list[str]:
        """Candidate names, cheapest first."""
        return [c.name for c in self._candidates]

    @property
    def costs(self) -> dict[str, float]:
        """USD per call of each candidate."""
        return {c.name: c.cost for c in self._candidates}

    def probs(self, texts: list[str]) -> np.ndarray:
        """[len(texts), len(candidates)] P(good), columns in `candidates` order."""
        return self.heads.probs(self.featurize(list(texts)))

    def predict(self, texts: list[str]) -> list[dict[str, float]]:
        """P(good) per candidate for each text."""
        return [dict(zip(self.candidates, map(float, row), strict=True)) for row in self.probs(texts)]

    def choose(self, text: str, threshold: float) -> str:
        """The cheapest candidate with P(good) >= threshold; the best-predicted one if none reaches it."""
        return self.choose_many([text], threshold)[0]

    def choose_many(self, texts: list[str], threshold: float) -> list[str]:
        """`choose` for a batch of texts: one feature pass for all of them."""
        return [self.candidates[i] for i in route(self.probs(texts), threshold)]

    def save(self, path: str | Path) -> Path:
        """Write the router directory (created if missing); returns it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "format": FORMAT,
            "candidates": [{"name": c.name, "cost": c.cost} for c in self._candidates],
            "features": self.features.to_dict(),
            "report": self.report,
        }
        h = self.heads
        save_file(
            {"mean": h.mean, "scale": h.scale, "coef": h.coef, "intercept": h.intercept},
            str(path / WEIGHTS_FILE),
        )
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LearnedRouter:
        """Read a router directory written by `save` (or `ember router train --out`)."""
        path = Path(path)
        config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not config_file.exists() or not weights_file.exists():
            raise RouterError(
                f"{path} is not a router: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                "(write one with `ember router train --out`)"
            )
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise RouterError(f"{config_file}: not JSON ({exc})") from exc
        if config.get("format") != FORMAT:
            raise RouterError(f"{config_file}: format {config.get('format')!r}; this ember reads {FORMAT!r}")
        w = load_file(str(weights_file))
        candidates = [Candidate(c["name"], float(c["cost"])) for c in config["candidates"]]
        heads = Heads(w["mean"], w["scale"], w["coef"], w["intercept"])
        if heads.coef.shape[0] != len(candidates):
            raise RouterError(
                f"{weights_file} has {heads.coef.shape[0]} heads for {len(candidates)} candidates"
            )
        return cls(candidates, FeatureConfig.from_dict(config["features"]), heads, config.get("report"))


def route(probs: np.ndarray, threshold: float) -> np.ndarray:
    """[n, k] P(good) with columns cheapest first -> [n] index of the chosen column per row."""
    if not 0 <= threshold <= 1:
        raise RouterError(
            f"threshold must be in [0, 1] (0: always the cheapest, 1: the best predicted), got {threshold}"
        )
    # The bar is the threshold, or the best prediction where none reaches it: the best-predicted candidate
    # always qualifies, so no input is left without one.
    bar = np.minimum(threshold, probs.max(axis=1, keepdims=True))
    return (probs >= bar).argmax(axis=1)  # the first, i.e. cheapest, qualifying column
