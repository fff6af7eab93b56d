"""`ember tune sft|dpo`: train a LoRA adapter here (progress bar, loss curve, report in --out), or with
--serve URL submit the same job to an ember server's fine-tuning API and follow it.

Import-light: the trainer (torch) is imported when a local run starts, so --help answers at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from ember.models.catalog import DEFAULT_MODEL

tune_app = typer.Typer(
    help="Fine-tune a LoRA adapter (SFT or DPO), here or on a server.", no_args_is_help=True
)

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _options(method: str):
    """The flags sft and dpo share (beta only for dpo); one definition, two commands."""

    def command(
        model: str = typer.Option(
            DEFAULT_MODEL, help="base model: a catalog name, an HF directory or a GGUF"
        ),
        data: Path = typer.Option(..., help="training JSONL (OpenAI's fine-tuning format)"),
        validation: Path | None = typer.Option(None, help="validation JSONL, same format"),
        out: Path | None = typer.Option(
            None, help="run directory: adapter, checkpoints, loss.png, report.md"
        ),
        epochs: int = typer.Option(1, min=1),
        lr: float = typer.Option(2e-4, help="peak learning rate (cosine schedule, warm-up)"),
        batch_size: int = typer.Option(8, min=1, help="examples per optimizer step"),
        rank: int = typer.Option(8, min=1, help="LoRA rank r"),
        alpha: int = typer.Option(16, min=1, help="LoRA alpha (scale alpha / r)"),
        target_modules: str = typer.Option(",".join(MODULES), help="comma-separated projections to adapt"),
        max_len: int = typer.Option(1024, min=16, help="tokens per example; longer ones are cut"),
        seed: int = typer.Option(0),
        beta: float = typer.Option(0.1, help="DPO's beta", hidden=method != "dpo"),
        serve: str | None = typer.Option(None, help="submit to this ember server (http://HOST:PORT) instead"),
        api_key: str | None = typer.Option(None, help="admin key for --serve (default: $OPENAI_API_KEY)"),
        suffix: str | None = typer.Option(None, help="with --serve: the fine-tuned model's name suffix"),
    ) -> None:
        modules = [m.strip() for m in target_modules.split(",") if m.strip()]
        unknown = sorted(set(modules) - set(MODULES))
        if unknown or not modules:
            _fail(
                f"--target-modules {','.join(unknown) or '(empty)'} invalid; choose from {','.join(MODULES)}"
            )
        for path in [data, validation]:
            if path is not None and not path.is_file():
                _fail(f"no such file: {path}")
        hyper = {"epochs": epochs, "learning_rate": lr, "batch_size": batch_size, "beta": beta}
        lora = {"r": rank, "alpha": alpha, "target_modules": modules}
        if serve is not None:
            return _remote(
                serve, api_key, method, model, data, validation, hyper, lora, max_len, seed, suffix
            )
        if out is None:
            _fail("--out is needed for a local run (where the adapter, the plot and the report go)")
        if suffix is not None:
            _fail("--suffix names a server's fine-tuned model; it goes with --serve")
        run_local(method, model, data, validation, out, hyper, lora, max_len, seed)

    command.__doc__ = {
        "sft": "Supervised fine-tuning on chat or prompt/completion JSONL.",
        "dpo": "Direct preference optimisation on preference JSONL (input, preferred/non_preferred output).",
    }[method]
    return command


tune_app.command("sft")(_options("sft"))
tune_app.command("dpo")(_options("dpo"))


def run_local(
    method: str,
    model: str,
    data: Path,
    validation: Path | None,
    out: Path,
    hyper: dict,
    lora: dict,
    max_len: int,
    seed: int,
    show: bool = True,
):
    """Check and tokenise the files, train with a progress bar, then write loss.png and report.md."""
    from ember.models.catalog import resolve_model
    from ember.tokenizer import Tokenizer
    from ember.tune import data as tune_data
    from ember.tune.report import RunLog, plot_losses, write_report
    from ember.tune.trainer import TuneConfig, train

    def checked(path: Path, what):
        try:
            return what(path)
        except tune_data.DataError as exc:
            _fail(f"{path}: {exc}")

    found = checked(data, tune_data.detect_method)
    if found != method:
        _fail(f"{data} holds {found} examples; run `ember tune {found}`")
    tokenizer = Tokenizer.from_dir(resolve_model(model))
    load = tune_data.load_sft if method == "sft" else tune_data.load_dpo
    train_set = checked(data, lambda p: load(p, tokenizer, max_len=max_len))
    valid_set = checked(validation, lambda p: load(p, tokenizer, max_len=max_len)) if validation else None
    cfg = TuneConfig(
        method=method,
        r=lora["r"],
        lora_alpha=lora["alpha"],
        target_modules=lora["target_modules"],
        epochs=hyper["epochs"],
        learning_rate=hyper["learning_rate"],
        batch_size=hyper["batch_size"],
        beta=hyper["beta"],
        max_len=max_len,
        seed=seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with RunLog(out, f"{method} {model}", show=show) as log:
        result = train(model, train_set, valid_set, cfg, str(out), on_event=log)
    plot_losses(log.metrics, out / "loss.png", f"ember tune {method}: {model}, {len(train_set)} examples")
    facts = {
        "model": model,
        "training data": f"{data} ({len(train_set)} examples, {train_set.truncated} cut to max_len)",
        "validation data": f"{validation} ({len(valid_set)} examples)" if valid_set is not None else "none",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
    }
    report = write_report(out, f"ember tune {method}", cfg, result, log.metrics, facts)
    typer.echo(
        f"{result.steps} steps, train loss {result.train_loss:.4f}"
        + (f", validation loss {result.valid_loss:.4f}" if result.valid_loss is not None else "")
        + f", {result.seconds:.0f} s\nadapter: {result.adapter_dir}\nreport: {report}"
    )
    return result


def _remote(url, api_key, method, model, data, validation, hyper, lora, max_len, seed, suffix) -> None:
    from rich.progress import Progress

    from ember.tune.remote import submit

    with Progress() as progress:
        task = progress.add_task(f"{method} {model} on {url}", total=None)

        def on_event(event: dict) -> None:
            if event["type"] == "metrics":
                progress.update(task, completed=event.get("step", 0), total=event.get("total_steps") or None)
                progress.console.print(
                    f"step {event.get('step')}: loss {event.get('train_loss', float('nan')):.4f}, "
                    f"{event.get('tokens_per_s', 0):.0f} tok/s"
                )
            else:
                progress.console.print(event["message"])

        key = api_key or os.environ.get("OPENAI_API_KEY")
        job = submit(url, key, method, model, data, validation, hyper, lora, max_len, seed, suffix, on_event)
    if job.status != "succeeded":
        error = getattr(job, "error", None)
        _fail(f"job {job.id} {job.status}" + (f": {error.message}" if error and error.message else ""))
    typer.echo(f"job {job.id} succeeded: model {job.fine_tuned_model}")


def _fail(message: str):
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)
