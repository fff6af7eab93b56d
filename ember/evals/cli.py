"""`ember eval SPEC`: run an eval file against a running ember (or any OpenAI-compatible) server through
the openai SDK, with a progress bar, and write its report (markdown, plot, JSON).

The spec (YAML or JSON):

    name: capitals                  # the report's title (default: the file's name)
    items: items.jsonl              # a JSONL file beside the spec (each line an item, or {"item": ...}), or a list
    input_messages:                 # OpenAI's template, or a bare list of {role, content}
      - {role: user, content: "What is the capital of {{item.country}}? One word."}
    criteria:                       # OpenAI testing criteria, and ember's pairwise_model
      - {type: string_check, name: exact, operation: ilike, input: "{{sample.output_text}}", reference: "{{item.capital}}"}
    models: [smollm2-135m-instruct]  # one model: its scores; two: A vs B, paired
    sampling_params: {max_completion_tokens: 16}
    seed: 0
    n_boot: 2000
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer

SPEC_KEYS = ("name", "items", "input_messages", "criteria", "testing_criteria", "models", "model",
             "sampling_params", "seed", "n_boot", "confidence")  # fmt: skip


def load_spec(path: Path) -> dict:
    """The spec with its items read and its models as a list; ValueError saying what is wrong."""
    import yaml

    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path} must hold a mapping (items, input_messages, criteria, models)")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key '{unknown[0]}'; known: {', '.join(SPEC_KEYS)}")
    items = spec.get("items")
    if isinstance(items, str):
        file = (path.parent / items).expanduser()
        try:
            lines = [json.loads(x) for x in file.read_text().splitlines() if x.strip()]
        except (OSError, ValueError) as exc:
            raise ValueError(f"items file {file}: {exc}") from None
        items = lines
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: 'items' must be a JSONL file or a non-empty list")
    spec["items"] = [
        x["item"] if isinstance(x, dict) and isinstance(x.get("item"), dict) else x for x in items
    ]
    models = spec.get("models", [spec["model"]] if "model" in spec else None)
    if isinstance(models, str):
        models = [models]
    if (
        not isinstance(models, list)
        or len(models) not in (1, 2)
        or not all(isinstance(m, str) for m in models)
    ):
        raise ValueError(f"{path}: 'models' must name one model, or two to compare")
    spec["models"] = models
    spec["criteria"] = spec.get("criteria", spec.get("testing_criteria"))
    if "input_messages" not in spec:
        raise ValueError(f"{path}: 'input_messages' is required (the prompt template)")
    spec.setdefault("name", path.stem)
    return spec


async def run_spec(spec: dict, client, concurrency: int, progress=None):
    """The Evaluation (one model) or Comparison (two) of `spec`, through `client` (openai.AsyncOpenAI)."""
    from ember.evals.compare import compare, openai_caller
    from ember.evals.evaluate import evaluate

    common = {
        "sampling_params": spec.get("sampling_params"),
        "seed": int(spec.get("seed", 0)),
        "n_boot": int(spec.get("n_boot", 2000)),
        "confidence": float(spec.get("confidence", 0.95)),
        "concurrency": concurrency,
        "progress": progress,
    }
    call = openai_caller(client)
    args = (call, spec["items"], spec["criteria"], spec["input_messages"])
    if len(spec["models"]) == 2:
        return await compare(*args, *spec["models"], **common)
    return await evaluate(*args, spec["models"][0], **common)


def eval_command(
    spec_path: Path = typer.Argument(..., help="the eval spec, YAML or JSON", exists=True, dir_okay=False),
    url: str = typer.Option(
        "http://127.0.0.1:8000", "--url", help="the server (its /v1 is appended if missing)"
    ),
    api_key: str = typer.Option("none", "--api-key", envvar="EMBER_API_KEY", help="the server's API key"),
    out: Path = typer.Option(Path("eval-report"), "--out", help="the report's directory"),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="items in flight"),
) -> None:
    """Run an eval spec against a server and write its report: markdown table + plot with the confidence
    intervals, and every item's sample and grades as JSON."""
    import openai
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ember.errors import InvalidRequest
    from ember.evals import report

    console = Console(stderr=True)
    try:
        spec = load_spec(spec_path)
    except ValueError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    base = url.rstrip("/")
    client = openai.AsyncOpenAI(
        base_url=base if base.endswith("/v1") else base + "/v1", api_key=api_key, max_retries=2
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"{spec['name']}: {' vs '.join(spec['models'])}", total=len(spec["items"]))
        try:
            result = asyncio.run(
                run_spec(spec, client, concurrency, lambda done, _n: bar.update(task, completed=done))
            )
        except InvalidRequest as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(2) from exc
    paths = report.write(result, out, spec["name"])
    typer.echo(paths["markdown"].read_text().split("\n![")[0])
    typer.echo(f"wrote {paths['markdown']}, {paths['plot']}, {paths['json']}")
