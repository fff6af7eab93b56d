"""Training a router: features of every input, a held-out split, one logistic regression per candidate
(scikit-learn's; its regularisation picked by cross-validated log loss, since the threshold reads its
probabilities, not only their order), the report, then a refit on everything.

The report holds what was measured on the held-out part: each candidate's AUC (how well the router orders
inputs by its chance of answering well) and the cost/quality curve against random routing (ember.router.curve).
The saved heads are refitted on all the examples, so the held-out numbers are a slight underestimate.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import numpy as np

from ember.gateway.usage import PriceTable
from ember.router.curve import compare
from ember.router.examples import GradedExample
from ember.router.features import FeatureConfig, Featurizer
from ember.router.model import Candidate, Heads, LearnedRouter, RouterError

log = logging.getLogger(__name__)

EMBED_CHUNK = 64  # texts per progress step
CV_FOLDS = 3
# Regularisation strengths tried. Not past 10: on separable inputs (common with a few hundred examples and
# 384 embedding dimensions) weaker ones only push the weights out, slowly, and the probabilities to 0 and 1.
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
MAX_ITER = 500


def candidate_costs(
    examples: list[GradedExample], names: list[str], costs: dict[str, float] | None, prices: PriceTable | None
) -> tuple[list[Candidate], np.ndarray]:
    """The candidates with their cost per call, and [n, k] what each example cost on each candidate.

    Costs per call as given (`--candidates a=COST`) price every call alike; a price table prices each
    example's own token usage, and a candidate's cost per call is then the mean over the examples."""
    n = len(examples)
    if costs is not None:
        per_call = np.array([costs[name] for name in names])
        each = np.broadcast_to(per_call, (n, len(names))).copy()
    elif prices is not None:
        each = np.empty((n, len(names)))
        for i, ex in enumerate(examples):
            for j, name in enumerate(names):
                u = ex.usage.get(name)
                if u is None:
                    raise RouterError(
                        f"example {i + 1} has no usage for '{name}'; a price table prices usage"
                    )
                each[i, j] = prices.cost(
                    name, u.get("prompt_tokens", 0), 0, u.get("completion_tokens", 0), False
                )
        per_call = each.mean(axis=0)
    else:
        raise RouterError(
            "give each candidate a cost (--candidates a=COST,b=COST) or a price table (--prices)"
        )
    return [Candidate(name, float(c)) for name, c in zip(names, per_call, strict=True)], each


def grade_matrix(examples: list[GradedExample], names: list[str]) -> np.ndarray:
    """[n, k] scores; every example must grade every candidate."""
    out = np.empty((len(examples), len(names)))
    for i, ex in enumerate(examples):
        missing = [name for name in names if name not in ex.scores]
        if missing:
            raise RouterError(
                f"example {i + 1} has no score for '{missing[0]}'; every example grades every candidate"
            )
        out[i] = [ex.scores[name] for name in names]
    return out


def fit_heads(x: np.ndarray, good: np.ndarray, seed: int) -> tuple[Heads, list[dict]]:
    """Standardise x [n, dim], fit one head per column of good [n, k] (bools); also what was fitted."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    coef, intercept, fitted = np.zeros((good.shape[1], x.shape[1])), np.zeros(good.shape[1]), []
    for j in range(good.shape[1]):
        y = good[:, j]
        minority = int(min(y.sum(), (~y).sum()))
        if minority == 0:
            # Always good (or never): nothing to learn but the rate, kept off 0 and 1 by add-one smoothing.
            rate = (y.sum() + 1) / (len(y) + 2)
            intercept[j] = math.log(rate / (1 - rate))
            fitted.append({"kind": "constant", "rate": float(y.mean())})
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # a fold with few of one class
            if minority >= 2:
                model = LogisticRegressionCV(
                    Cs=list(C_GRID),
                    cv=min(CV_FOLDS, minority),
                    scoring="neg_log_loss",
                    l1_ratios=(0.0,),
                    use_legacy_attributes=False,
                    max_iter=MAX_ITER,
                    random_state=seed,
                ).fit(z, y)
                c = float(np.atleast_1d(model.C_)[0])
            else:
                model, c = LogisticRegression(max_iter=MAX_ITER).fit(z, y), 1.0
        coef[j], intercept[j] = model.coef_[0], model.intercept_[0]
        fitted.append({"kind": "logistic", "C": c})
    return Heads(scaler.mean_, scaler.scale_, coef, intercept), fitted


def train(
    examples: list[GradedExample],
    costs: dict[str, float] | None = None,
    prices: PriceTable | None = None,
    features: FeatureConfig | None = None,
    holdout: float = 0.2,
    pass_score: float = 0.5,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> LearnedRouter:
    """A router over the candidates of `costs` (else every candidate the examples grade).

    An answer counts as good when its score is >= pass_score. `progress(n)` is told each time n more
    inputs have been featurised."""
    from sklearn.metrics import roc_auc_score

    if not 0 < holdout < 1:
        raise RouterError(f"holdout must be a fraction in (0, 1), got {holdout}")
    if len(examples) < 10:
        raise RouterError(f"{len(examples)} examples are too few to train and hold out; give at least 10")
    names = list(costs) if costs is not None else sorted({name for ex in examples for name in ex.scores})
    if len(names) < 2:
        raise RouterError(f"a router needs at least two candidates; the examples grade only {names}")
    scores = grade_matrix(examples, names)
    candidates, each_cost = candidate_costs(examples, names, costs, prices)
    features = features or FeatureConfig()
    featurize = Featurizer(features)
    texts = [ex.input for ex in examples]
    chunks = []
    for start in range(0, len(texts), EMBED_CHUNK):
        chunks.append(featurize(texts[start : start + EMBED_CHUNK]))
        if progress is not None:
            progress(len(chunks[-1]))
    x = np.concatenate(chunks)
    good = scores >= pass_score

    order = np.random.default_rng(seed).permutation(len(examples))
    n_out = max(1, round(len(examples) * holdout))
    out, inn = order[:n_out], order[n_out:]
    heads, _ = fit_heads(x[inn], good[inn], seed)
    held = LearnedRouter(candidates, features, heads)
    # LearnedRouter orders columns cheapest first: put the held-out matrices in the same order.
    cols = [names.index(name) for name in held.candidates]
    probs = held.heads.probs(x[out])
    per_candidate = {}
    for j, name in enumerate(held.candidates):
        y = good[out, cols[j]]
        auc = float(roc_auc_score(y, probs[:, j])) if 0 < y.sum() < len(y) else None
        per_candidate[name] = {
            "cost_per_call": held.costs[name],
            "good_rate": float(good[:, cols[j]].mean()),
            "mean_score": float(scores[:, cols[j]].mean()),
            "heldout_auc": auc,
        }
    heads, fitted = fit_heads(x, good, seed)
    for name, fit in zip(names, fitted, strict=True):
        per_candidate[name]["head"] = fit
    report = {
        "examples": len(examples),
        "heldout": int(n_out),
        "pass_score": pass_score,
        "seed": seed,
        "feature_dim": int(x.shape[1]),
        "candidates": per_candidate,
        "heldout_curve": compare(probs, scores[out][:, cols], each_cost[out][:, cols]),
    }
    return LearnedRouter(candidates, features, heads, report)
