"""The learned router: graded examples -> P(good) per candidate -> the cheapest candidate likely to answer
well (model), trained by `ember router train` (train, cli), measured against random routing (curve)."""

from ember.router.model import Candidate, LearnedRouter, RouterError

__all__ = ["Candidate", "LearnedRouter", "RouterError"]
