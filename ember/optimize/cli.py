"""`ember optimize --workload W --objective O --out DIR`: a workload and an objective in, a measured
Pareto front and a DeploymentSpec out (see ember.optimize)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import typer

from ember.models.catalog import DEFAULT_MODEL


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(
                f"'{item}' is not NAME=VALUE (e.g. scheduler.max_num_seqs=8,32)", param_hint=flag
            )
        out[name.strip()] = value
    return out


def optimize_command(
    objective: str = typer.Option(
        ..., "--objective", "-o", help="e.g. 'ttft_p95<=800ms, quality>=0.98, minimize cost'"
    ),
    workload: Path | None = typer.Option(
        None,
        "--workload",
        "-w",
        help="a workload JSONL: `ember bench serve`'s workload.jsonl or exported traces",
    ),
    shape: str | None = typer.Option(
        None, "--shape", help="generate the workload instead: chat, rag or edit"
    ),
    num_requests: int = typer.Option(24, "--num-requests", min=1, help="generated workloads: requests"),
    rate: float = typer.Option(
        4.0, "--rate", help="generated workloads: arrivals per second (Poisson; inf: at once)"
    ),
    output_len: int = typer.Option(16, "--output-len", min=1, help="generated workloads: tokens per answer"),
    seed: int = typer.Option(0, "--seed", help="generated workloads: the seed"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="catalog name, local path or HF repo id"),
    base: Path | None = typer.Option(
        None,
        "--base",
        help="a DeploymentSpec whose engine settings are the default (what the pick must beat)",
    ),
    vary: list[str] = typer.Option(
        [], "--vary", help="NAME=a,b,c: try these values of a setting (repeatable)"
    ),
    fix: list[str] = typer.Option([], "--fix", help="NAME=v: hold a setting (repeatable)"),
    levels: int = typer.Option(4, "--levels", min=2, help="points taken across a numeric search range"),
    replays: int = typer.Option(4, "--replays", min=1, help="real replays at most, the default's included"),
    price: float | None = typer.Option(
        None, "--price", help="$ per machine-hour (default: 0.10 cpu, 2.50 cuda)"
    ),
    out: Path = typer.Option(
        Path("optimize-out"), "--out", help="results, and the state a rerun resumes from"
    ),
) -> None:
    """Search the config schema's space for the deployment that best meets the objective on this workload:
    predict every configuration with the real scheduler on a simulated clock (a profile of this machine),
    confirm the most promising by real replays, write the front, the plot, the spec and the report."""
    from rich.console import Console

    from ember.config import DeploymentSpec, EngineConfig
    from ember.config.schema import ConfigError
    from ember.optimize.objective import ObjectiveError, parse_objective
    from ember.optimize.workload import generate, load

    console = Console(stderr=True)
    try:
        varied, held = _pairs(vary, "--vary"), _pairs(fix, "--fix")
        goal = parse_objective(objective)
        if (workload is None) == (shape is None):
            raise typer.BadParameter("give --workload FILE or --shape chat|rag|edit (one of them)")
        work = (
            load(workload)
            if workload is not None
            else generate(
                shape, num_requests=num_requests, rate=rate, output_len=output_len, seed=seed, model=model
            )
        )
        engine = DeploymentSpec.load(base).engine if base is not None else EngineConfig(model=model)
        if base is not None and model != DEFAULT_MODEL:
            engine = DeploymentSpec.from_dict(
                {**DeploymentSpec(engine=engine).to_dict(), "model": model}
            ).engine
    except (ObjectiveError, ConfigError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    try:
        run(
            work,
            goal,
            engine,
            varied,
            held,
            levels,
            replays,
            price,
            out,
            console,
        )
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def run(work, goal, engine, vary, fix, levels, replays, price, out: Path, console) -> None:
    """The search itself, with its progress on the terminal and its files in `out`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ember.config.schema import to_plain
    from ember.optimize import predict as pr
    from ember.optimize import report
    from ember.optimize.replay import replay
    from ember.optimize.search import State, search
    from ember.optimize.space import candidates, default, held, space

    values = space(vary=vary, fix=fix, levels=levels)
    baseline = default(values, engine)
    engine = held(values, engine)
    grid = candidates(values, engine)
    out.mkdir(parents=True, exist_ok=True)
    work.save(out / "workload.jsonl")
    scope = hashlib.sha256(
        json.dumps([work.key, goal.slos_ms, to_plain(engine)], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    state = State(out / "state.json", scope)
    price = price if price is not None else pr.PRICES.get(engine.device.split(":")[0], pr.PRICES["cpu"])
    varied = sorted({name for c in grid for name, _ in c.settings})
    console.print(f"{len(grid)} configurations over {', '.join(varied) or 'nothing'}; objective: {goal}")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:

        def bar(label: str, total: int):
            task = progress.add_task(label, total=total)
            return lambda: progress.advance(task)

        outputs = None
        if any(c.get("speculative.method") == "ngram" for c in grid):
            if "outputs" not in state.data:
                progress.add_task("greedy answers (for speculation)", total=None)
                state.data["outputs"] = pr.greedy_outputs(work, engine.model)
                state.save()
            outputs = state.data["outputs"]
        predictor = pr.Predictor(work, engine, goal.slos_ms, outputs)
        quality_cache: dict = {}
        prompts = [i.prompt for i in work.items[:4]]
        names = iter(range(10**6))
        outcome = search(
            grid,
            baseline,
            goal,
            predictor,
            lambda c: pr.quality_of(c, engine, prompts, quality_cache),
            lambda c: replay(
                c.engine(engine), work, goal.slos_ms, out / "replays", f"config-{next(names)}-{_slug(c)}"
            ),
            lambda m: pr.with_cost(m, price),
            state,
            replays,
            bar,
            predictor.calibrate,
        )
    context = f"Workload `{work.name}` ({len(work.items)} requests), model `{engine.model}`, price ${price}/machine-hour."
    spec = report.write(outcome, goal, engine, out, context)
    Console().print(report.rich_table(outcome))
    console.print(report.explain(outcome, goal))
    if spec is None:
        console.print(f"[red]infeasible:[/red] {outcome.infeasible}")
        raise typer.Exit(1)
    console.print(f"wrote {out}/report.md, front.md, front.png; serve it: ember serve --config {spec}")


def _slug(c) -> str:
    return hashlib.sha256(c.key.encode()).hexdigest()[:8]
