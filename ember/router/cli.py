"""`ember router train`: graded examples (a JSONL file, or stored eval runs, one per candidate) -> a router
directory, with its training report (held-out AUC per candidate, the cost/quality curve against random
routing, as JSON and a PNG) written beside the weights.

    ember router train --examples graded.jsonl --candidates small=0.0001,large=0.0009 --out router/
    ember router train --eval evalrun-a --eval evalrun-b --prices prices.json --out router/
"""

from __future__ import annotations

from pathlib import Path

import typer

router_app = typer.Typer(
    help="Learned routers: send each request to the cheapest candidate likely to do well."
)


def parse_candidates(text: str) -> dict[str, float]:
    """'a=0.1,b=2' -> {"a": 0.1, "b": 2.0}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, cost = part.partition("=")
        try:
            value = float(cost)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or value < 0:
            raise typer.BadParameter(
                f"'{part}' is not NAME=COST (USD per call, >= 0)", param_hint="--candidates"
            )
        out[name.strip()] = value
    if len(out) < 2:
        raise typer.BadParameter("name at least two candidates", param_hint="--candidates")
    return out


@router_app.command("train")
def train_command(
    out: Path = typer.Option(
        ..., "--out", help="the router directory to write (router.json, weights, report)"
    ),
    examples: Path | None = typer.Option(
        None, "--examples", help="graded examples, JSONL: {input, scores: {candidate: 0..1}, usage?}"
    ),
    eval_runs: list[str] = typer.Option(
        [],
        "--eval",
        help="an eval run id, one per candidate (repeat), over the same items; its model names it",
    ),
    candidates: str | None = typer.Option(
        None,
        "--candidates",
        help="a=COST,b=COST: the candidates and their USD per call (default: all graded)",
    ),
    prices: Path | None = typer.Option(
        None, "--prices", help="a gateway price table (JSON/YAML) to price each example's usage instead"
    ),
    embedding: str = typer.Option(
        "all-minilm-l6-v2", "--embedding", help="embedding model for the features, or 'none'"
    ),
    text_features: bool = typer.Option(
        True, "--text-features/--no-text-features", help="cheap text statistics"
    ),
    holdout: float = typer.Option(0.2, "--holdout", help="fraction of the examples held out for the report"),
    pass_score: float = typer.Option(
        0.5, "--pass-score", help="a score at least this counts as a good answer"
    ),
    seed: int = typer.Option(0, "--seed"),
    data_dir: str | None = typer.Option(None, "--data-dir", help="the store's data dir (for --eval)"),
    database_url: str | None = typer.Option(None, "--database-url", help="the store's database (for --eval)"),
) -> None:
    """Train a router from graded examples and write it to --out."""
    from rich.progress import Progress

    from ember.gateway.usage import PriceTable
    from ember.router.curve import plot
    from ember.router.examples import from_eval_runs, load_jsonl
    from ember.router.features import FeatureConfig
    from ember.router.model import RouterError
    from ember.router.train import train

    if (examples is None) == (not eval_runs):
        raise typer.BadParameter("give either --examples FILE or --eval RUN_ID (one per candidate)")
    costs = parse_candidates(candidates) if candidates else None
    try:
        table = PriceTable.load(prices) if prices else None
        features = FeatureConfig(embedding=None if embedding == "none" else embedding, text=text_features)
        if examples is not None:
            graded = load_jsonl(examples)
        else:
            from ember.config.server import ServerConfig
            from ember.store.db import Store

            config = ServerConfig(data_dir=data_dir, database_url=database_url)
            graded = from_eval_runs(Store(config.store_url()), eval_runs)
        with Progress(transient=True) as progress:
            task = progress.add_task("features", total=len(graded))
            router = train(
                graded, costs, table, features, holdout, pass_score, seed, lambda n: progress.advance(task, n)
            )
    except (RouterError, ValueError, OSError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    router.save(out)
    report = router.report
    curve = report["heldout_curve"]
    plot(curve, router.candidates, str(out / "curve.png"))
    typer.echo(f"trained on {report['examples']} examples, {report['heldout']} held out; written to {out}")
    for name, entry in report["candidates"].items():
        auc = "n/a (one class)" if entry["heldout_auc"] is None else f"{entry['heldout_auc']:.3f}"
        typer.echo(
            f"  {name}: ${entry['cost_per_call']:.6g}/call, good {entry['good_rate']:.0%}, held-out AUC {auc}"
        )
    typer.echo("held-out curve (threshold: cost, quality vs random):")
    for p in curve["points"][:: max(1, len(curve["points"]) // 10)]:
        typer.echo(
            f"  {p['threshold']:.3g}: ${p['cost']:.6g}, {p['quality']:.3f} vs {p['random_quality']:.3f}"
        )
    verdict = "dominates" if curve["dominates"] else "does NOT dominate"
    typer.echo(f"the router {verdict} random routing on the held-out set (min gain {curve['min_gain']:+.3f})")
