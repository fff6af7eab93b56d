"""`ember tune --serve URL`: the same job sent to a server's /v1/files and /v1/fine_tuning/jobs with the
openai SDK, then followed through its events until it ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

BASE_LR = 2e-4  # the server's learning rate at multiplier 1 (OpenAI's API takes a multiplier)
FINAL = ("succeeded", "failed", "cancelled")


def submit(
    url: str,
    api_key: str | None,
    method: str,
    model: str,
    data: Path,
    validation: Path | None,
    hyper: dict,
    lora: dict,
    max_len: int,
    seed: int,
    suffix: str | None = None,
    on_event: Callable[[dict], None] | None = None,
    poll_s: float = 2.0,
    client=None,
):
    """Upload the files, create the job, relay its events to `on_event` (metrics events as the trainer's:
    step, total_steps, train_loss...) and return the finished job."""
    if client is None:
        from openai import OpenAI

        client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "EMPTY")
    with data.open("rb") as f:
        training = client.files.create(file=f, purpose="fine-tune")
    valid = None
    if validation is not None:
        with validation.open("rb") as f:
            valid = client.files.create(file=f, purpose="fine-tune")
    kind = "supervised" if method == "sft" else "dpo"
    hyperparameters = {
        "n_epochs": hyper["epochs"],
        "batch_size": hyper["batch_size"],
        "learning_rate_multiplier": hyper["learning_rate"] / BASE_LR,
    }
    if method == "dpo":
        hyperparameters["beta"] = hyper["beta"]
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=training.id,
        validation_file=valid.id if valid else None,
        method={"type": kind, kind: {"hyperparameters": hyperparameters}},
        seed=seed,
        suffix=suffix,
        extra_body={"lora": lora, "max_len": max_len},
    )
    emit = on_event or (lambda _e: None)
    seen: set[str] = set()
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        for ev in reversed(events):  # the API lists newest first
            if ev.id in seen:
                continue
            seen.add(ev.id)
            data_ = getattr(ev, "data", None) or {}
            if ev.type == "metrics" and data_:
                emit({"type": "metrics", **data_})
            else:
                emit({"type": "message", "message": ev.message})
        if job.status in FINAL:
            return job
        time.sleep(poll_s)
