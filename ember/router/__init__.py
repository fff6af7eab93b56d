"""The learned router: graded examples -> P(good) per candidate -> the cheapest candidate likely to answer
well (model), trained by `ember router train` (train, cli), measured against random routing (curve).

The names are loaded on first use, so `ember --version` and the CLI's flag errors answer without torch."""

__all__ = ["Candidate", "LearnedRouter", "RouterError"]


def __getattr__(name: str):
    if name in __all__:
        from ember.router import model

        return getattr(model, name)
    raise AttributeError(f"module 'ember.router' has no attribute {name!r}")
