"""`ember flywheel`: start a flywheel run on a server (POST /v1/flywheel/runs), follow it step by step and
print (and write) its report. The run is the server's: interrupting this command does not stop it.

    ember flywheel --alias support-bot --traces 'tag=support' --eval eval.json --api-key $ADMIN

--traces: comma-separated filters; `model`, `created_after`, `created_before` (unix seconds), `min_score`
and `limit` are the selection's own, every other key=value is a metadata tag the stored completion must
carry.
--eval: a JSON or YAML file {"items": [...] or "items_file": "held_out.jsonl", "input_messages": [...],
"testing_criteria": [...], "sampling_params"?: {...}}, as the Evals API names them.
Exit status: 0 when the run completed (promoted or not: the report says which), 1 when it failed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

FILTERS = {"model": str, "created_after": int, "created_before": int, "min_score": float, "limit": int}
DONE = ("completed", "failed", "cancelled")


def parse_traces(text: str) -> dict:
    """'tag=support,min_score=0.5' -> {"metadata": {"tag": "support"}, "min_score": 0.5}."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"'{part}' is not key=value", param_hint="--traces")
        key, value = key.strip(), value.strip()
        if key in FILTERS:
            try:
                out[key] = FILTERS[key](value)
            except ValueError:
                raise typer.BadParameter(
                    f"{key} takes a number (got '{value}')", param_hint="--traces"
                ) from None
        else:
            out.setdefault("metadata", {})[key] = value
    return out


def load_eval(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        spec = yaml.safe_load(text)
    else:
        spec = json.loads(text)
    if not isinstance(spec, dict):
        raise typer.BadParameter("the eval file must hold an object", param_hint="--eval")
    if "items_file" in spec:
        items_path = (path.parent / spec.pop("items_file")).resolve()
        spec["items"] = [json.loads(line) for line in items_path.read_text().splitlines() if line.strip()]
    return spec


def flywheel(
    alias: str = typer.Option(..., help="the alias to improve: it is repointed only if the gate passes"),
    traces: str = typer.Option("", help="which stored completions to train on: 'tag=support,model=x,...'"),
    eval_file: Path = typer.Option(
        ..., "--eval", exists=True, dir_okay=False, help="the held-out eval (JSON/YAML)"
    ),
    relabel_with: str | None = typer.Option(None, help="a stronger model to answer the prompts again"),
    relabel_url: str | None = typer.Option(
        None, help="the OpenAI-compatible endpoint serving --relabel-with"
    ),
    relabel_key: str | None = typer.Option(None, envvar="EMBER_RELABEL_KEY", help="its API key"),
    traces_key: str | None = typer.Option(
        None, envvar="EMBER_TRACES_KEY", help="the API key whose traces to use (default: the admin key's own)"
    ),
    url: str = typer.Option("http://127.0.0.1:8000", envvar="EMBER_URL", help="the ember server"),
    api_key: str = typer.Option(..., envvar="EMBER_ADMIN_KEY", help="the server's admin key"),
    epochs: int | None = typer.Option(None, help="fine-tuning epochs (default: the job's auto)"),
    batch_size: int | None = typer.Option(None, help="fine-tuning batch size"),
    lr_multiplier: float | None = typer.Option(None, help="learning-rate multiplier (of 2e-4)"),
    rank: int | None = typer.Option(None, help="LoRA rank"),
    max_len: int | None = typer.Option(None, help="longest training example, in tokens"),
    near_dedupe: float = typer.Option(
        0.8, help="drop prompts this similar to one kept (estimated Jaccard); 0: exact duplicates only"
    ),
    min_examples: int = typer.Option(8, help="fail the run if the traces give fewer training examples"),
    max_latency_ratio: float | None = typer.Option(2.0, help="latency guard: candidate p50 / baseline p50"),
    report: Path | None = typer.Option(None, help="write the report (markdown) here too"),
    timeout: float = typer.Option(3600.0, help="stop following the run after this many seconds"),
) -> None:
    """Traffic -> dataset -> tune -> evaluate against the alias -> promote if better -> report."""
    import httpx
    from rich.console import Console
    from rich.markdown import Markdown

    console = Console(stderr=True)
    selection = parse_traces(traces)
    selection["dedupe"] = {"near_threshold": near_dedupe or None}
    if traces_key:
        selection["api_key"] = traces_key
    hyper = {"n_epochs": epochs, "batch_size": batch_size, "learning_rate_multiplier": lr_multiplier}
    body = {
        "alias": alias,
        "traces": selection,
        "eval": load_eval(eval_file),
        "hyperparameters": {k: v for k, v in hyper.items() if v is not None},
        "min_examples": min_examples,
        "gate": {"max_latency_ratio": max_latency_ratio},
    }
    if relabel_with:
        body["relabel_with"] = {"model": relabel_with, "base_url": relabel_url, "api_key": relabel_key}
    if rank is not None:
        body["lora"] = {"r": rank, "alpha": 2 * rank}
    if max_len is not None:
        body["max_len"] = max_len
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=60) as http:
        r = http.post("/v1/flywheel/runs", json=body)
        if r.status_code != 200:
            _refused(console, r)
        run = r.json()
        console.print(f"flywheel run [bold]{run['id']}[/] on alias [bold]{alias}[/]")
        run = _follow(http, console, run["id"], time.monotonic() + timeout)
    console.print(Markdown(run["report"] or ""))
    typer.echo(run["report"] or "")
    if report is not None:
        report.write_text(run["report"] or "")
        console.print(f"report written to {report}")
    if run["status"] != "completed":
        raise typer.Exit(1)


def _follow(http, console, run_id: str, deadline: float) -> dict:
    """Print the run's events as they come, with the running step's progress, until it is done."""
    last, shown = 0, None
    with console.status("queued") as status:
        while True:
            for event in http.get(f"/v1/flywheel/runs/{run_id}/events", params={"after": last}).json()[
                "data"
            ]:
                last = event["seq"]
                style = "red" if event["level"] == "error" else "dim"
                console.print(
                    f"[{style}]{time.strftime('%H:%M:%S', time.localtime(event['created_at']))}[/] {event['message']}"
                )
            run = http.get(f"/v1/flywheel/runs/{run_id}").json()
            if run["status"] in DONE:
                return run
            step = run["step"]
            detail = (run["steps"].get(step) or {}).get("detail") if step else None
            line = f"{step or run['status']}" + (f": {detail}" if detail else "")
            if line != shown:
                status.update(line)
                shown = line
            if time.monotonic() > deadline:
                console.print(f"[yellow]still {line} after the timeout; the run goes on on the server[/]")
                raise typer.Exit(1)
            time.sleep(1.0)


def _refused(console, response) -> None:
    try:
        error = response.json()["error"]
        why = f"{error['message']}" + (f" (param {error['param']})" if error.get("param") else "")
    except (ValueError, KeyError, TypeError):
        why = response.text[:500]
    console.print(f"[red]error {response.status_code}:[/] {why}")
    raise typer.Exit(2)
