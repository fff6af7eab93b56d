"""The loop's parts as ember provides them, each behind one call (ember.flywheel.loop.Parts): the dataset
(stored completions -> a fine-tune file), the tuning job, the comparison of two models on an eval, and the
alias (what it serves; repoint it).
"""

from __future__ import annotations

from ember.server.files_api import Refusal
from ember.server.platform import BATCH_PRIORITY, PlatformContext


async def dataset(
    ctx: PlatformContext, owner: str | None, traces: dict, relabel: dict | None, name: str
) -> dict:
    """The SFT dataset of `traces["tenant"]`'s stored completions that the rest of `traces` selects
    (ember.server.flywheel_api.create_dataset: select, dedupe, relabel with `relabel`, each line read as
    the trainer reads it), stored as `owner`'s fine-tune file: {file_id, examples, selected, counts}."""
    from ember.server.flywheel_api import DatasetRequest, create_dataset

    selection = {k: v for k, v in traces.items() if k != "tenant"}
    body = DatasetRequest(**selection, method="sft", relabel=relabel, filename=f"{name}.jsonl")
    try:
        made = await create_dataset(ctx, traces["tenant"], body, admin=True, owner=owner)
    except Refusal as exc:
        raise DatasetFailed(str(exc)) from None
    counts = made["counts"]
    return {
        "file_id": made["file"]["id"],
        "examples": counts.get("written", 0),
        "selected": counts.get("selected", 0),
        "counts": counts,
    }


class DatasetFailed(Exception):
    """The traces gave no dataset (none matched, every one was dropped): the message says which."""


async def tune(ctx: PlatformContext, tenant: str | None, file_id: str, spec: dict, run_id: str) -> dict:
    """A fine-tuning job on the served base model over `file_id`, served to every key (the flywheel is the
    admin's); the job's row."""
    from ember.flywheel.loop import suffix
    from ember.server.tuning_api import served_base, submit
    from ember.tune.spec import JobRequest

    tuning = ctx.state.tuning
    body = JobRequest(
        model=ctx.model_name,
        training_file=file_id,
        suffix=suffix(spec["alias"]),
        seed=spec["seed"],
        method={"type": "supervised", "supervised": {"hyperparameters": spec["hyperparameters"]}},
        metadata={"flywheel_run": run_id},
        lora=spec.get("lora"),
        max_len=spec.get("max_len"),
    )
    source, template, max_rank = served_base(ctx.engine, ctx.model_name)
    return await submit(tuning.store, tuning.runner, body, tenant, True, source, template, max_rank)


async def compare(
    call, eval_spec: dict, model_a: str, model_b: str, tenant: str | None, gate, progress=None
) -> dict:
    """Both models on the eval's items, scored by its criteria, with the paired bootstrap interval of b - a
    per criterion (ember.evals.compare): {"items", "confidence", "criteria": [{name, n, errored, mean_a,
    mean_b, diff, ci_low, ci_high}]}; the numbers are None for a criterion no item was scored on."""
    from ember.evals.compare import compare as evals_compare

    result = await evals_compare(
        call,
        eval_spec["items"],
        eval_spec["testing_criteria"],
        eval_spec["input_messages"],
        model_a,
        model_b,
        sampling_params=eval_spec.get("sampling_params"),
        tenant=tenant,
        priority=BATCH_PRIORITY,
        seed=gate.seed,
        n_boot=gate.n_boot,
        confidence=gate.confidence,
        progress=progress,
    )
    keys = ("name", "n", "errored", "mean_a", "mean_b", "diff", "ci_low", "ci_high")
    return {
        "items": len(eval_spec["items"]),
        "confidence": gate.confidence,
        "criteria": [{k: getattr(c, k) for k in keys} for c in result.criteria],
    }


def alias(ctx: PlatformContext, name: str, tenant: str | None) -> dict | None:
    """What the alias `name` serves now: {"version", "serves" (its card), "model" (the name that pins that
    version in a request: the version's adapter, or the base)}; None if there is no such alias."""
    target = ctx.backend.aliases.get(name)
    if target is None:
        return None
    return {"version": target.version, "serves": target.card, "model": target.adapter or ctx.model_name}


async def repoint(
    ctx: PlatformContext, name: str, model: str, expected_version: int, run_id: str
) -> dict | None:
    """Point the alias at `model` (a fine-tuned model's name) if it is still at `expected_version`: what it
    serves then (as `alias`), or None if it had moved (another repoint won)."""
    from ember.server.aliases_api import Aliases, AliasRepoint

    aliases = next(s for s in ctx.services if isinstance(s, Aliases))
    body = AliasRepoint(model=model, expected_version=expected_version, metadata={"flywheel_run": run_id})
    try:
        await aliases.point(name, body, create=False, expected=expected_version)
    except Refusal as exc:
        if exc.status == 409:
            return None
        raise
    return alias(ctx, name, None)
