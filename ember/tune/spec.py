"""A fine-tuning job's options as OpenAI's API takes them (`method`, `hyperparameters`) plus ember's extras
(`lora`, `max_len`), checked at request time, stored as one JSON spec, and turned into the trainer's
TuneConfig by the worker. Imports no torch: the HTTP layer reads it.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ember.errors import InvalidRequest

METHODS = {"supervised": "sft", "dpo": "dpo"}  # OpenAI's method type -> the trainer's
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What "auto" resolves to. The learning rate is BASE_LR times the multiplier.
AUTO = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0, "beta": 0.1}
BASE_LR = 2e-4
LORA_DEFAULTS = {"r": 8, "alpha": 16, "target_modules": list(MODULES)}
MAX_LEN_DEFAULT = 1024
# name -> (type, low, high), bounds inclusive
BOUNDS: dict[str, tuple[type, float, float]] = {
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 256),
    "learning_rate_multiplier": (float, 1e-3, 100.0),
    "beta": (float, 1e-3, 10.0),
}
SUFFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class JobRequest(BaseModel):
    """POST /v1/fine_tuning/jobs, as the openai SDK sends it; `lora` and `max_len` are ember's (extra_body)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any] | None = None  # the legacy top-level form
    method: dict[str, Any] | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None
    lora: dict[str, Any] | None = None
    max_len: int | None = Field(None, ge=16, le=131072)


def job_spec(body: JobRequest, max_rank: int | None = None) -> dict:
    """The checked spec of a job: {"method", "hyperparameters" (resolved), "lora", "max_len"}; InvalidRequest
    naming the field at fault."""
    if body.integrations:
        raise InvalidRequest("integrations are not supported by ember", param="integrations")
    if body.suffix is not None and not SUFFIX.match(body.suffix):
        raise InvalidRequest(
            "suffix must be 1-64 letters, digits, '-', '_' or '.'", param="suffix", code="invalid_suffix"
        )
    if body.metadata is not None and (len(body.metadata) > 16 or any(len(k) > 64 for k in body.metadata)):
        raise InvalidRequest("metadata takes at most 16 keys of up to 64 characters", param="metadata")
    method = body.method or {"type": "supervised"}
    kind = method.get("type")
    if kind not in METHODS:
        raise InvalidRequest(
            f"unknown method type {kind!r}; ember trains: {', '.join(METHODS)}",
            param="method.type",
            code="invalid_method",
        )
    extra = set(method) - {"type", kind}
    if extra:
        raise InvalidRequest(f"method.{sorted(extra)[0]} does not go with method type {kind}", param="method")
    inner = method.get(kind) or {}
    if not isinstance(inner, dict) or set(inner) - {"hyperparameters"}:
        raise InvalidRequest(f"method.{kind} takes only 'hyperparameters'", param=f"method.{kind}")
    given = inner.get("hyperparameters")
    where = f"method.{kind}.hyperparameters"
    if given is not None and body.hyperparameters is not None:
        raise InvalidRequest(
            "hyperparameters are given twice: in method and at the top level; give them in method",
            param="hyperparameters",
        )
    if given is None:
        given, where = body.hyperparameters or {}, "hyperparameters"
    if not isinstance(given, dict):
        raise InvalidRequest("hyperparameters must be an object", param=where)
    allowed = ["n_epochs", "batch_size", "learning_rate_multiplier"] + (["beta"] if kind == "dpo" else [])
    hyper = {}
    for name, value in given.items():
        if name not in allowed:
            raise InvalidRequest(
                f"unknown hyperparameter '{name}' for {kind}; known: {', '.join(allowed)}",
                param=f"{where}.{name}",
            )
        hyper[name] = _number(name, value, f"{where}.{name}")
    for name in allowed:
        hyper.setdefault(name, AUTO[name])
    lora = _lora(body.lora, max_rank)
    return {
        "method": kind,
        "hyperparameters": hyper,
        "lora": lora,
        "max_len": body.max_len or MAX_LEN_DEFAULT,
    }


def _number(name: str, value: Any, param: str) -> float | int:
    if value == "auto":
        return AUTO[name]
    kind, low, high = BOUNDS[name]
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and kind is int and not float(value).is_integer():
        ok = False
    if not ok or not low <= value <= high:
        what = "an integer" if kind is int else "a number"
        raise InvalidRequest(
            f"{name} must be 'auto' or {what} in [{low:g}, {high:g}] (got {value!r})", param=param
        )
    return kind(value)


def _lora(given: dict | None, max_rank: int | None) -> dict:
    out = dict(LORA_DEFAULTS)
    for key, value in (given or {}).items():
        if key not in out:
            raise InvalidRequest(f"lora takes r, alpha and target_modules (got '{key}')", param=f"lora.{key}")
        out[key] = value
    r, alpha, modules = out["r"], out["alpha"], out["target_modules"]
    top = max_rank or 256
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= top:
        raise InvalidRequest(f"lora.r must be an integer in [1, {top}] (got {r!r})", param="lora.r")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise InvalidRequest(f"lora.alpha must be a positive number (got {alpha!r})", param="lora.alpha")
    if not isinstance(modules, list) or not modules or any(m not in MODULES for m in modules):
        raise InvalidRequest(
            f"lora.target_modules must be a non-empty list of: {', '.join(MODULES)}",
            param="lora.target_modules",
        )
    return {"r": r, "alpha": alpha, "target_modules": list(dict.fromkeys(modules))}


def tune_config(spec: dict, seed: int) -> dict:
    """The keyword arguments of ember.tune.trainer.TuneConfig for a stored spec."""
    hyper, lora = spec["hyperparameters"], spec["lora"]
    kw = {
        "method": METHODS[spec["method"]],
        "r": lora["r"],
        "lora_alpha": lora["alpha"],
        "target_modules": lora["target_modules"],
        "epochs": hyper["n_epochs"],
        "batch_size": hyper["batch_size"],
        "learning_rate": BASE_LR * hyper["learning_rate_multiplier"],
        "max_len": spec["max_len"],
        "seed": seed,
    }
    if spec["method"] == "dpo":
        kw["beta"] = hyper["beta"]
    return kw


def method_object(spec: dict) -> dict:
    """The `method` of a job object, as OpenAI shows it."""
    kind = spec["method"]
    return {"type": kind, kind: {"hyperparameters": dict(spec["hyperparameters"])}}
