"""Checking testing criteria before anything runs: each grader's fields, in OpenAI's shapes (and ember's
pairwise_model), with an InvalidRequest naming the field at fault (`testing_criteria[2].operation`)."""

from __future__ import annotations

from typing import Any

from ember.errors import InvalidRequest
from ember.evals.template import content_text

STRING_OPS = ("eq", "ne", "like", "ilike")
SIMILARITY = (
    "fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l", "cosine"
)  # fmt: skip
UNAVAILABLE = {"meteor": "NLTK's WordNet data, which is not installed"}
EMBEDDING_MODEL = "all-minilm-l6-v2"  # cosine's default: what `ember serve` serves at /v1/embeddings
TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "pairwise_model")
MAX_SANDBOX_S = 60.0
MAX_SANDBOX_MB = 4096


def check_criteria(criteria: Any, param: str = "testing_criteria") -> list[dict]:
    """The testing criteria as given, each checked: InvalidRequest naming the field at fault."""
    if not isinstance(criteria, list) or not criteria:
        raise InvalidRequest(f"{param} must be a non-empty list of graders", param=param)
    names = set()
    for i, grader in enumerate(criteria):
        at = f"{param}[{i}]"
        if not isinstance(grader, dict):
            raise InvalidRequest(f"{at} must be an object", param=at)
        kind = grader.get("type")
        if kind not in TYPES:
            raise InvalidRequest(
                f"{at}.type {kind!r} is not a grader; one of: {', '.join(TYPES)}", param=at + ".type"
            )
        _text(grader, "name", at)
        if grader["name"] in names:
            raise InvalidRequest(f"{at}.name {grader['name']!r} is used twice", param=at + ".name")
        names.add(grader["name"])
        _CHECKS[kind](grader, at)
    return criteria


def _text(grader: dict, key: str, at: str, required: bool = True) -> None:
    if key not in grader and not required:
        return
    if not isinstance(grader.get(key), str):
        raise InvalidRequest(f"{at}.{key} must be a string", param=f"{at}.{key}")


def _number(grader: dict, key: str, at: str, required: bool = False) -> None:
    value = grader.get(key)
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{at}.{key} must be a number", param=f"{at}.{key}")


def _check_string(g: dict, at: str) -> None:
    _text(g, "input", at)
    _text(g, "reference", at)
    if g.get("operation") not in STRING_OPS:
        raise InvalidRequest(
            f"{at}.operation must be one of {', '.join(STRING_OPS)}, got {g.get('operation')!r}",
            param=at + ".operation",
        )


def _check_similarity(g: dict, at: str) -> None:
    _text(g, "input", at)
    _text(g, "reference", at)
    metric = g.get("evaluation_metric")
    if metric in UNAVAILABLE:
        raise InvalidRequest(
            f"{at}.evaluation_metric '{metric}' is not available here (it needs {UNAVAILABLE[metric]}); "
            f"one of: {', '.join(SIMILARITY)}",
            param=at + ".evaluation_metric",
        )
    if metric not in SIMILARITY:
        raise InvalidRequest(
            f"{at}.evaluation_metric must be one of {', '.join(SIMILARITY)}, got {metric!r}",
            param=at + ".evaluation_metric",
        )
    _number(g, "pass_threshold", at, required=True)
    _text(g, "model", at, required=False)  # ember's: the embeddings model of `cosine`


def _check_python(g: dict, at: str) -> None:
    _text(g, "source", at)
    try:
        compile(g["source"], "<grader>", "exec")
    except SyntaxError as exc:
        raise InvalidRequest(f"{at}.source does not compile: {exc}", param=at + ".source") from None
    _number(g, "pass_threshold", at)
    _number(g, "timeout_s", at)
    _number(g, "memory_limit_mb", at)
    if not 0 < g.get("timeout_s", 1) <= MAX_SANDBOX_S:
        raise InvalidRequest(f"{at}.timeout_s must be in (0, {MAX_SANDBOX_S:g}]", param=at + ".timeout_s")
    if not 16 <= g.get("memory_limit_mb", 512) <= MAX_SANDBOX_MB:
        raise InvalidRequest(
            f"{at}.memory_limit_mb must be in [16, {MAX_SANDBOX_MB}]", param=at + ".memory_limit_mb"
        )


def _check_messages(g: dict, at: str, required: bool = True) -> None:
    messages = g.get("input")
    if messages is None and not required:
        return
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(f"{at}.input must be a non-empty list of messages", param=at + ".input")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system", "developer"):
            raise InvalidRequest(
                f"{at}.input[{j}] must be a message with role user, assistant, system or developer",
                param=f"{at}.input[{j}]",
            )
        try:
            content_text(m.get("content"))
        except InvalidRequest as exc:
            raise InvalidRequest(
                f"{at}.input[{j}].content: {exc}", param=f"{at}.input[{j}].content"
            ) from None


def _check_model(g: dict, at: str) -> None:
    _text(g, "model", at)
    params = g.get("sampling_params")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequest(f"{at}.sampling_params must be an object", param=at + ".sampling_params")


def _check_score(g: dict, at: str) -> None:
    _check_model(g, at)
    _check_messages(g, at)
    lo_hi = g.get("range", [0, 1])
    if (
        not isinstance(lo_hi, list)
        or len(lo_hi) != 2
        or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in lo_hi)
        or lo_hi[0] >= lo_hi[1]
    ):
        raise InvalidRequest(f"{at}.range must be [low, high] with low < high", param=at + ".range")
    _number(g, "pass_threshold", at)


def _check_label(g: dict, at: str) -> None:
    _check_model(g, at)
    _check_messages(g, at)
    labels = g.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise InvalidRequest(f"{at}.labels must be a non-empty list of strings", param=at + ".labels")
    passing = g.get("passing_labels")
    if not isinstance(passing, list) or not passing or not set(passing) <= set(labels):
        raise InvalidRequest(
            f"{at}.passing_labels must be a non-empty subset of labels", param=at + ".passing_labels"
        )


def _check_pairwise(g: dict, at: str) -> None:
    _check_model(g, at)
    _text(g, "prompt", at, required=False)
    _text(g, "reference", at, required=False)
    _text(g, "instructions", at, required=False)
    _number(g, "pass_threshold", at)


_CHECKS = {
    "string_check": _check_string,
    "text_similarity": _check_similarity,
    "python": _check_python,
    "score_model": _check_score,
    "label_model": _check_label,
    "pairwise_model": _check_pairwise,
}
