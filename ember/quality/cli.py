"""`ember quality --model M --quantization Q`: the fidelity report of one or more settings against the
float32 unquantized reference (ember.quality.fidelity), on the built-in prompt set or a file's."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from ember.models.catalog import DEFAULT_MODEL


def quality_command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="catalog name, local path or HF repo id"),
    quantization: list[str] = typer.Option(
        ...,
        "--quantization",
        "-q",
        help="the setting to score: q4_1, q8_0, int4, int8, auto or none (with --dtype bfloat16: bf16); repeat "
        "it to score several against one reference",
    ),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="activation dtype; default: the one each quantization runs with (int4: bfloat16)",
    ),
    prompts_file: Path | None = typer.Option(
        None,
        "--prompts",
        help="a JSON list of prompts, or JSONL; default: the built-in set (chat, code, numbers)",
    ),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="greedy tokens per prompt"),
    out: Path = typer.Option(
        Path("quality-report"), "--out", help="the report's directory (markdown + JSON)"
    ),
) -> None:
    """Score each setting against the float32 unquantized reference: greedy token agreement, next-token KL
    (mean, p99), identical continuations, and decode tokens/s of both; a table here, markdown + JSON in --out."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ember.config import engine_config
    from ember.config.auto import AUTO, NATURAL_DTYPE
    from ember.quality import report
    from ember.quality.fidelity import measure, reference
    from ember.quality.prompts import builtin_prompts, load_prompts

    def fail(exc: Exception) -> typer.Exit:
        typer.secho(f"error: {exc}", fg="red", err=True)
        return typer.Exit(2)

    try:
        prompts = load_prompts(prompts_file) if prompts_file is not None else builtin_prompts()
        settings = []
        for q in quantization:
            q = None if q.strip().lower() in ("", "none") else q.strip().lower()
            natural = AUTO if q == AUTO else NATURAL_DTYPE.get(q, "float32")  # unknown: refused below
            cfg = engine_config(model=model, quantization=q, dtype=dtype or natural)
            settings.append((cfg.quantization, cfg.dtype))
    except ValueError as exc:  # ConfigError included: the setting named, with what to change
        raise fail(exc) from exc
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    results = []
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("reference float32", total=len(prompts))

        def done(i: int, n: int) -> None:  # the bar of the setting being scored now
            bar.update(task, completed=i, total=n)

        try:
            ref = reference(model, prompts=prompts, max_tokens=max_tokens, progress=done)
            for q, d in settings:
                task = bar.add_task(f"{q or 'none'} / {d}", total=len(prompts))
                results.append(
                    measure(
                        model,
                        quantization=q,
                        dtype=d,
                        prompts=prompts,
                        max_tokens=max_tokens,
                        reference=ref,
                        progress=done,
                    )
                )
        except (ValueError, RuntimeError) as exc:
            raise fail(exc) from exc
    Console().print(report.table(results))
    # The command that reproduces the report, rebuilt from the options (argv is a test runner's in tests).
    words = ["ember", "quality", "--model", model, *(w for q in quantization for w in ("--quantization", q))]
    words += [
        *(["--dtype", dtype] if dtype else []),
        *(["--prompts", str(prompts_file)] if prompts_file else []),
    ]
    command = shlex.join([*words, "--max-tokens", str(max_tokens), "--out", str(out)])
    paths = report.write(results, out, command)
    typer.echo(f"wrote {paths['markdown']}, {paths['json']}")
