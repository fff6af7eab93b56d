"""A flywheel run's request (ember.server.flywheel_api.RunRequest) checked into the spec its row stores:
every option the later steps use is checked here, so that a bad one is a 4xx naming it, not a run that
fails an hour later. Whose traces: the key in `traces.api_key` (presenting a key is the right to its
traces, as a request made with it would be), else the requester's own.
"""

from __future__ import annotations

import hmac

from ember.errors import InvalidRequest
from ember.evals.criteria import check_criteria
from ember.evals.sampling import check_input_messages, check_sampling_params
from ember.flywheel.gate import Gate
from ember.flywheel.loop import Parts, suffix
from ember.server.files_api import Refusal
from ember.server.platform import PlatformContext
from ember.tune.spec import JobRequest, job_spec


def run_spec(ctx: PlatformContext, parts: Parts, body, tenant: str | None) -> dict:
    """The stored spec of a RunRequest made by `tenant`; InvalidRequest or Refusal naming the field."""
    if ctx.state.tuning is None:
        raise InvalidRequest(
            "a flywheel run tunes an adapter: start the server with --fine-tuning",
            code="fine_tuning_disabled",
        )
    if parts.alias(ctx, body.alias, tenant) is None:
        why = f"no alias named '{body.alias}'; create it with POST /v1/aliases"
        raise Refusal(404, why, "alias", "alias_not_found")
    traces = body.traces.model_dump(exclude={"api_key"})
    traces["tenant"] = tenant
    if body.traces.api_key is not None:
        key = body.traces.api_key.encode()
        if not any(hmac.compare_digest(key, k.encode()) for k in ctx.state.api_keys):
            raise InvalidRequest(
                "traces.api_key is not one of this server's API keys", param="traces.api_key"
            )
        traces["tenant"] = ctx.state.tenant(body.traces.api_key)
    if traces["include_truncated"] is None:
        traces["include_truncated"] = body.relabel_with is not None
    job = JobRequest(
        model=ctx.model_name,
        training_file="file-made-by-the-run",
        suffix=suffix(body.alias),
        method={"type": "supervised", "supervised": {"hyperparameters": body.hyperparameters or {}}},
        lora=body.lora,
        max_len=body.max_len,
    )
    hyper = job_spec(job)["hyperparameters"]
    try:
        gate = Gate(**body.gate.model_dump())
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="gate") from None
    check_criteria(body.eval.testing_criteria, "eval.testing_criteria")
    check_input_messages(body.eval.input_messages, "eval.input_messages")
    check_sampling_params(body.eval.sampling_params, "eval.sampling_params")
    names = [c["name"] for c in body.eval.testing_criteria]
    if gate.primary is not None and gate.primary not in names:
        raise InvalidRequest(
            f"gate.primary '{gate.primary}' is not a criterion; criteria: {', '.join(names)}",
            param="gate.primary",
        )
    relabel = None
    if body.relabel_with is not None:  # its api_key is held by the runner, not stored
        relabel = {
            **body.relabel_with.model_dump(exclude={"api_key"}),
            "keyed": body.relabel_with.api_key is not None,
        }
    return {
        "alias": body.alias,
        "traces": traces,
        "relabel_with": relabel,
        "eval": body.eval.model_dump(),
        "hyperparameters": hyper,
        "lora": body.lora,
        "max_len": body.max_len,
        "seed": body.seed,
        "min_examples": body.min_examples,
        "gate": gate.as_dict(),
        "metadata": body.metadata,
    }
