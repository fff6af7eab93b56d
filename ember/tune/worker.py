"""The process a fine-tuning job runs in, never the server's: `python -m ember.tune.worker validate|train
JOB_ID --database-url URL --data-dir DIR`. The server (ember.tune.runner) starts one per job phase and
reads what this writes to the store.

validate: every line of the training (and validation) file through ember.tune.data; the job goes
queued, or failed with the bad line in `error`. train: ember.tune.trainer.train with events and
checkpoints written as they come; `should_stop` reads the job's status (a cancel, or a restarted server
that gave the job up) and whether the server is still alive. On success it records the adapter's
directory and the tokens trained; the server then registers the adapter and marks the job succeeded.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from ember.store import db
from ember.store.db import Store
from ember.tune.spec import METHODS, tune_config


def job_dir(data_dir: str | Path, job_id: str) -> Path:
    return Path(data_dir) / "jobs" / job_id


def file_path(data_dir: str | Path, file_id: str) -> Path:
    return Path(data_dir) / "files" / file_id


class _Tokenizer:
    """The base model's tokenizer, loaded when first used (a file refused before it is read costs none)."""

    def __init__(self, source: str, chat_template: str | None):
        self._args, self._tok = (source, chat_template), None

    def __getattr__(self, name: str):
        if self._tok is None:
            from ember.models.catalog import resolve_model
            from ember.tokenizer import Tokenizer

            source, template = self._args
            self._tok = Tokenizer.from_dir(resolve_model(source), chat_template=template)
        return getattr(self._tok, name)


def _tokenizer(source: str, chat_template: str | None) -> _Tokenizer:
    return _Tokenizer(source, chat_template)


def _load(data, job: dict, data_dir: str, tokenizer) -> tuple[list, list | None]:
    """(train, validation) examples; DataError names the file at fault in `.param`."""
    spec = job["spec"]
    load = data.load_dpo if spec["method"] == "dpo" else data.load_sft
    out = []
    for param in ("training_file", "validation_file"):
        if job[param] is None:
            out.append(None)
            continue
        path = str(file_path(data_dir, job[param]))
        try:
            found = data.detect_method(path)
            if found != METHODS[spec["method"]]:
                want = "preference pairs (input, preferred_output, non_preferred_output)"
                if found == "sft":
                    want = "chat examples (messages)"
                raise data.DataError(
                    f"the file holds {want}, which method type {spec['method']} does not train on"
                )
            out.append(load(path, tokenizer, max_len=spec["max_len"]))
        except data.DataError as exc:
            exc.param = param
            raise
    return out[0], out[1]


def validate(store: Store, job: dict, data_dir: str, data) -> None:
    try:
        tok = _tokenizer(job["source"], job["spec"].get("chat_template"))
        train, valid = _load(data, job, data_dir, tok)
    except data.DataError as exc:
        fail(store, job["id"], "invalid_file", str(exc), exc.param, ("validating_files",))
        return
    n = f"{len(train)} examples" + (f", {len(valid)} for validation" if valid else "")
    if store.update(db.jobs, job["id"], {"status": "queued"}, only_if_status=("validating_files",)):
        store.add_event(job["id"], f"Files validated: {n}; the job is queued")


def train(store: Store, job: dict, data_dir: str, data, trainer, parent: int | None) -> None:
    job_id = job["id"]
    out = job_dir(data_dir, job_id)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(job["source"], job["spec"].get("chat_template"))
    try:
        train_data, valid_data = _load(data, job, data_dir, tok)
    except data.DataError as exc:
        fail(store, job_id, "invalid_file", str(exc), exc.param, ("running",))
        return
    store.add_event(job_id, "Fine-tuning job started")
    started = time.time()
    last_check = [0.0, False]

    def should_stop() -> bool:
        if parent is not None and os.getppid() != parent:
            return True  # the server is gone: the job is failed when it starts again
        if time.monotonic() - last_check[0] > 0.5:
            row = store.get(db.jobs, job_id)
            last_check[:] = [time.monotonic(), row is None or row["status"] != "running"]
        return last_check[1]

    def on_event(event: dict) -> None:
        if event.get("type") == "checkpoint":
            metrics = event.get("metrics", {})
            store.insert(
                db.checkpoints,
                {
                    "id": db.new_id("ftckpt"),
                    "job_id": job_id,
                    "created_at": db.now(),
                    "step_number": event["step"],
                    "path": event["path"],
                    "metrics": {
                        "step": float(event["step"]),
                        "train_loss": metrics.get("train_loss"),
                        "train_mean_token_accuracy": metrics.get("token_accuracy"),
                        "valid_loss": metrics.get("valid_loss"),
                        "valid_mean_token_accuracy": metrics.get("valid_token_accuracy"),
                        "full_valid_loss": metrics.get("valid_loss"),
                        "full_valid_mean_token_accuracy": None,
                    },
                },
            )
            store.add_event(job_id, f"Checkpoint saved at step {event['step']}")
            return
        step, total = event.get("step", 0), event.get("total_steps", 0)
        data_ = {k: v for k, v in event.items() if k != "type" and isinstance(v, int | float)}
        data_["train_mean_token_accuracy"] = event.get("token_accuracy")
        message = f"Step {step}/{total}: training loss={event.get('train_loss', float('nan')):.4f}"
        if "valid_loss" in event:
            message += f", validation loss={event['valid_loss']:.4f}"
        store.add_event(job_id, message, type="metrics", data=data_)
        if step and total:
            eta = started + (time.time() - started) * total / step
            store.update(db.jobs, job_id, {"estimated_finish": int(eta)}, only_if_status=("running",))

    cfg = trainer.TuneConfig(**tune_config(job["spec"], job["seed"]))
    try:
        result = trainer.train(job["source"], train_data, valid_data, cfg, str(out), on_event, should_stop)
    except trainer.TrainingCancelled:
        store.add_event(job_id, "Training stopped")
        return
    done = {"adapter_dir": result.adapter_dir, "trained_tokens": int(result.tokens)}
    store.update(db.jobs, job_id, done, only_if_status=("running",))
    store.add_event(
        job_id, f"Training done: {result.steps} steps, {result.tokens} tokens, {result.seconds:.0f} s"
    )


def fail(store: Store, job_id: str, code: str, message: str, param: str | None, only_if: tuple) -> None:
    values = {"status": "failed", "error": {"code": code, "message": message, "param": param}}
    if store.update(db.jobs, job_id, {**values, "finished_at": db.now()}, only_if_status=only_if):
        store.add_event(job_id, f"The job failed: {message}", level="error")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ember.tune.worker")
    p.add_argument("phase", choices=("validate", "train"))
    p.add_argument("job_id")
    p.add_argument("--database-url", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--parent", type=int, default=None, help="the server's pid: stop when it is gone")
    p.add_argument("--trainer", default="ember.tune.trainer", help="the module with train and TuneConfig")
    p.add_argument("--data", default="ember.tune.data", help="the module with load_sft, load_dpo, DataError")
    args = p.parse_args(argv)
    store = Store(args.database_url)
    job = store.get(db.jobs, args.job_id)
    if job is None:
        print(f"no job {args.job_id}", file=sys.stderr)
        return 2
    data = importlib.import_module(args.data)
    if args.phase == "validate":
        validate(store, job, args.data_dir, data)
    else:
        train(store, job, args.data_dir, data, importlib.import_module(args.trainer), args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
