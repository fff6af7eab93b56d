"""Router features: text -> one float vector, from ember's sentence embeddings and/or cheap text statistics.

The embedding says what an input is about (the task it belongs to, which is what decides whether a cheap
model gets it right); the text statistics say how big and how symbolic it is (long or digit-heavy inputs are
where small models fail first) at no cost. Which of them a router uses is part of its file, so a loaded
router computes exactly the features it was trained on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from ember.embeddings import DEFAULT_EMBEDDING_MODEL, KNOWN_EMBEDDING_MODELS, EmbeddingModel

TEXT_FEATURES = ("log_chars", "log_words", "digit_frac", "upper_frac", "punct_frac", "questions", "lines")


@dataclass(frozen=True)
class FeatureConfig:
    """Which features a router computes: `embedding` is an embedding model (catalog name or directory) or
    None for none; `text` adds the cheap statistics of TEXT_FEATURES."""

    embedding: str | None = DEFAULT_EMBEDDING_MODEL
    text: bool = True

    def __post_init__(self):
        if self.embedding is None and not self.text:
            raise ValueError(
                "a router needs features: give an embedding model "
                f"(known: {', '.join(sorted(KNOWN_EMBEDDING_MODELS))}) or turn on text features"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FeatureConfig:
        return cls(embedding=data.get("embedding"), text=bool(data.get("text", True)))


def text_stats(text: str) -> list[float]:
    """The values of TEXT_FEATURES for one text, each O(1) in scale (logs and fractions)."""
    n = max(len(text), 1)
    return [
        math.log1p(len(text)),
        math.log1p(len(text.split())),
        sum(c.isdigit() for c in text) / n,
        sum(c.isupper() for c in text) / n,
        sum(not c.isalnum() and not c.isspace() for c in text) / n,
        float(text.count("?")),
        float(text.count("\n") + 1),
    ]


class Featurizer:
    """Texts -> [len(texts), dim] float64, as `config` says. The embedding model loads on first use."""

    def __init__(self, config: FeatureConfig) -> None:
        self.config = config

    @cached_property
    def embedder(self) -> EmbeddingModel:
        return EmbeddingModel.load(self.config.embedding)

    @property
    def names(self) -> list[str]:
        """One name per column, for the training report."""
        names = []
        if self.config.embedding is not None:
            names += [f"emb_{i}" for i in range(self.embedder.dim)]
        if self.config.text:
            names += list(TEXT_FEATURES)
        return names

    def __call__(self, texts: list[str]) -> np.ndarray:
        parts = []
        if self.config.embedding is not None:
            parts.append(self._embed(texts))
        if self.config.text:
            parts.append(np.array([text_stats(t) for t in texts], dtype=np.float64).reshape(len(texts), -1))
        return np.concatenate(parts, axis=1)

    def _embed(self, texts: list[str]) -> np.ndarray:
        # A router input may be longer than the encoder takes (256 tokens for MiniLM): what it is about
        # shows in its head, so keep the first tokens and the closing [SEP] rather than refuse the request.
        limit = self.embedder.max_input_tokens
        ids = [t if len(t) <= limit else t[: limit - 1] + t[-1:] for t in self.embedder.tokenize(texts)]
        return self.embedder.embed(ids).double().numpy()  # [len(texts), dim]
