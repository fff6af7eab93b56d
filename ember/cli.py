"""The `ember` command."""

from __future__ import annotations

import logging
import sys

import typer

from ember.models.catalog import DEFAULT_MODEL

app = typer.Typer(help="ember: serve and run open models on ember's own engine.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m", help="catalog name, local path or HF repo id")


def _engine(model: str, device: str, dtype: str, kv_cache_memory: str):
    from ember import CacheConfig, EngineConfig, LLMEngine

    try:
        return LLMEngine(
            EngineConfig(
                model=model, device=device, dtype=dtype, cache=CacheConfig(kv_cache_memory=kv_cache_memory)
            )
        )
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


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the prompt text"),
    model: str = ModelOpt,
    max_tokens: int = typer.Option(128, help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0),
    seed: int | None = typer.Option(None),
    stop: list[str] = typer.Option([], help="stop string (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt as a user message in the chat template"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    kv_cache_memory: str = typer.Option("1GiB", help="memory budget for the KV block pool"),
) -> None:
    """Generate a completion for PROMPT, streaming it to stdout."""
    from ember import SamplingParams

    engine = _engine(model, device, dtype, kv_cache_memory)
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop
        )
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        _stream(engine, ids, params)
    except ValueError as exc:
        typer.secho(f"\nerror: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    sys.stdout.write("\n")


@app.command()
def chat(
    model: str = ModelOpt,
    system: str | None = typer.Option(None, help="system prompt"),
    max_tokens: int = typer.Option(512),
    temperature: float = typer.Option(0.7),
    top_p: float = typer.Option(0.9),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    kv_cache_memory: str = typer.Option("1GiB"),
) -> None:
    """Chat interactively; replies stream as they are generated. Ctrl-D or /exit to leave."""
    from ember import SamplingParams

    engine = _engine(model, device, dtype, kv_cache_memory)
    messages = [{"role": "system", "content": system}] if system else []
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    typer.secho(f"chatting with {model} (/exit to leave, /reset to forget)", fg="cyan", err=True)
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
def serve(
    model: str = ModelOpt,
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    served_model_name: str | None = typer.Option(None, help="the name clients use (default: --model)"),
    api_key: list[str] = typer.Option([], help="accepted API key (repeatable); none: the API is open"),
    cache_namespace: list[str] = typer.Option(
        [],
        help="NAME=KEY1,KEY2: these API keys share one prefix-cache namespace (repeatable); "
        "every other key has its own",
    ),
    no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache", help="turn prefix caching off"),
    lora: list[str] = typer.Option(
        [], help="NAME=PATH: a PEFT LoRA adapter to serve as model NAME (repeatable)"
    ),
    admin_key: str | None = typer.Option(
        None, help="key for /v1/adapters (runtime adapter loading); implies LoRA"
    ),
    enable_lora: bool = typer.Option(False, "--enable-lora", help="serve LoRA adapters (implied by --lora)"),
    max_loras: int = typer.Option(8, help="adapter slots in memory; more adapters wait in host memory"),
    max_lora_rank: int = typer.Option(64, help="the largest LoRA rank accepted"),
    max_queue: int = typer.Option(256, help="requests that may wait beyond max-num-seqs; past it, 429"),
    shutdown_timeout: float = typer.Option(30.0, help="seconds a SIGTERM drain waits for requests in flight"),
    embedding_model: str = typer.Option("all-minilm-l6-v2", help="served at /v1/embeddings; 'none' to skip"),
    engine_mode: str = typer.Option(
        "process", help="where the engine core steps: process (measured faster) or thread"
    ),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    quantization: str = typer.Option(
        "none",
        help="q4_1 or q8_0: GGUF block formats on ember's AVX2 kernels (float32, the fastest on CPUs "
        "without AVX-512); int4: 4-bit weights with --dtype bfloat16; int8: any dtype (CPU)",
    ),
    kv_cache_memory: str = typer.Option("2GiB", help="memory budget for the KV block pool"),
    max_num_seqs: int = typer.Option(128, help="cap on running sequences"),
    max_num_batched_tokens: int = typer.Option(2048, help="token budget per engine step"),
    speculative: str = typer.Option(
        "none", help="speculative decoding: ngram (prompt lookup), draft:MODEL (a smaller model) or none"
    ),
    num_speculative_tokens: int = typer.Option(4, help="the most tokens proposed per sequence per step"),
    draft_num_layers: int | None = typer.Option(None, help="keep only the draft model's first N layers"),
) -> None:
    """Serve the OpenAI-compatible API."""
    from ember import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
    from ember.config import LoRAConfig
    from ember.server.run import ServeOptions
    from ember.server.run import serve as run_server

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        config = EngineConfig(
            model=model,
            device=device,
            dtype=dtype,
            quantization=quantization,
            cache=CacheConfig(kv_cache_memory=kv_cache_memory, enable_prefix_caching=not no_prefix_cache),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
            ),
            lora=LoRAConfig(
                enabled=enable_lora or bool(lora) or admin_key is not None,
                max_loras=max_loras,
                max_rank=max_lora_rank,
            ),
            speculative=SpeculativeConfig.parse(
                speculative, num_speculative_tokens=num_speculative_tokens, draft_num_layers=draft_num_layers
            ),
        )
        options = ServeOptions(
            loras=ServeOptions.parse_loras(lora),
            admin_key=admin_key,
            host=host,
            port=port,
            model_name=served_model_name or model,
            api_keys=api_key,
            cache_namespaces=ServeOptions.parse_namespaces(cache_namespace),
            max_queue=max_queue,
            shutdown_timeout=shutdown_timeout,
            embedding_model=None if embedding_model.lower() == "none" else embedding_model,
            engine_mode=engine_mode,
            log_level=log_level,
        )
        code = run_server(config, options)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(code)


@bench_app.command("offline")
def bench_offline(
    model: str = ModelOpt,
    num_prompts: int = typer.Option(64, help="chat prompts for ember (one batch)"),
    max_tokens: int = typer.Option(128, help="new tokens per prompt (EOS ignored)"),
    hf_prompts: int = typer.Option(8, help="prompts HF transformers generates one at a time (0: skip HF)"),
    dtype: list[str] = typer.Option(["float32"], help="ember weight dtype (repeatable: one run each)"),
    out: str | None = typer.Option(None, help="write the results as JSON here"),
) -> None:
    """ember batched vs HF transformers `generate` one prompt at a time: output tokens/s and the ratio."""
    from ember.bench.offline import run_offline

    run_offline(model, num_prompts, max_tokens, hf_prompts, out, dtype)


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


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":
    main()
