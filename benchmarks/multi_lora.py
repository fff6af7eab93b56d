"""Multi-LoRA serving cost: output throughput with requests spread over 1, 8 and 64 adapters vs the bare
base model, same prompts, one run.

    .venv/bin/python benchmarks/multi_lora.py [--adapters 1,8,64] [--concurrency 16] [--rank 8]

Writes random PEFT-format adapters for the default model (rank `--rank` on q, k, v, o, gate, up and
down), starts one `ember serve` with all of them (`--max-loras 8` slots: 64 adapters swap in and out),
then sends the same `random` requests (256 in, 64 out) to the base model and, with the `multi-lora`
workload's Zipf skew, to 1, 8 and 64 adapters. Writes `<out>/MULTI_LORA.md` and
`<out>/results/multi-lora.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import MODEL, ROOT, _cpu_name, server  # noqa: E402

from ember.bench.serving import BenchConfig, WorkloadConfig, run_benchmark  # noqa: E402
from ember.bench.serving.report import result_to_json  # noqa: E402
from ember.lora.adapter import MODULES, module_shapes  # noqa: E402
from ember.models.catalog import resolve_model  # noqa: E402
from ember.models.config import ModelConfig  # noqa: E402


def write_adapters(root: Path, count: int, rank: int) -> list[str]:
    cfg = ModelConfig.from_dir(resolve_model(MODEL))
    shapes = module_shapes(cfg)
    names = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(cfg.num_hidden_layers):
            for module in MODULES:
                out, inp = shapes[module]
                group = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                key = f"base_model.model.model.layers.{layer}.{group}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) * 0.01
                tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.01
        path = root / f"lora-{i}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES)}
        (path / "adapter_config.json").write_text(json.dumps(config))
        names.append(f"lora-{i}={path}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default="1,8,64")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    ap.add_argument("--render-only", action="store_true", help="redo MULTI_LORA.md from the JSON")
    args = ap.parse_args()
    counts = [int(c) for c in args.adapters.split(",")]
    out = Path(args.out)
    if args.render_only:
        data = json.loads((out / "results" / "multi-lora.json").read_text())
        desc = _shorten(data["desc"])
        count = max(r["adapters"] for r in data["runs"])
        text = render(
            data["runs"], desc, data["seed"], data.get("rank", 8), data.get("concurrency", 16), count
        )
        (out / "MULTI_LORA.md").write_text(text)
        return
    (out / "results").mkdir(parents=True, exist_ok=True)
    seed = int.from_bytes(os.urandom(3), "little")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        specs = write_adapters(Path(tmp), max(counts), args.rank)
        flags = ["--kv-cache-memory", "1GiB", "--max-loras", "8", "--max-lora-rank", str(args.rank)]
        for spec in specs:
            flags += ["--lora", spec]
        ns = argparse.Namespace(concurrency=[args.concurrency], llama_server="")
        with server("ember", ns, out / "results", flags) as (url, desc):
            for label, count in [("base", 0)] + [(f"{c} adapters", c) for c in counts]:
                if count:
                    wl = WorkloadConfig(kind="multi-lora", input_len=256, output_len=64, num_adapters=count)
                else:
                    wl = WorkloadConfig(kind="random", input_len=256, output_len=64)
                wl = dataclasses.replace(wl, num_requests=args.requests, seed=seed)
                cfg = BenchConfig(
                    base_url=url, model=MODEL, workload=wl, max_concurrency=args.concurrency, ignore_eos=True
                )
                print(f"{label}: {args.requests} requests at concurrency {args.concurrency}", flush=True)
                r = run_benchmark(cfg)
                m = r.metrics
                print(
                    f"  {m.output_throughput:.1f} tok/s, TPOT p50 {m.tpot.median:.0f} ms, failed {m.failed}"
                )
                runs.append({"label": label, "adapters": count, **result_to_json(r)})
    desc = _shorten(desc)
    meta = {"seed": seed, "desc": desc, "rank": args.rank, "concurrency": args.concurrency}
    (out / "results" / "multi-lora.json").write_text(json.dumps({**meta, "runs": runs}))
    text = render(runs, desc, seed, args.rank, args.concurrency, max(counts))
    (out / "MULTI_LORA.md").write_text(text)
    print(text)


def _shorten(desc: str) -> str:
    """The server's command line with its many `--lora NAME=PATH` flags folded into one."""
    loras = re.findall(r" --lora [^\s`]+", desc)
    if not loras:
        return desc
    for flag in loras[1:]:
        desc = desc.replace(flag, "", 1)
    return desc.replace(loras[0], f" --lora lora-i=DIR/lora-i (x{len(loras)})", 1)


def render(runs: list[dict], desc: str, seed: int, rank: int, concurrency: int, adapters: int) -> str:
    base = runs[0]["metrics"]["output_throughput"]
    lines = [
        "# Multi-LoRA: throughput over many adapters vs the base model",
        "",
        f"`benchmarks/multi_lora.py`, {time.strftime('%Y-%m-%d')}, {_cpu_name()} ({os.cpu_count()} cores); "
        f"one server ({desc}; {adapters} adapters of rank {rank} on all seven projections, 8 slots), "
        f"the same `random` prompts (256 in, 64 out, seed {seed}) for every row, concurrency {concurrency}, "
        "requests spread over the adapters with the multi-lora workload's Zipf skew (s = 1.1).",
        "",
        "```bash",
        ".venv/bin/python benchmarks/multi_lora.py",
        "```",
        "",
        "| requests go to | completed | output tok/s | vs base | TTFT p50 ms | TPOT p50 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        m = run["metrics"]
        lines.append(
            f"| {run['label']} | {m['completed']}/{m['completed'] + m['failed']} | {m['output_throughput']:.1f} | "
            f"{m['output_throughput'] / base:.2f}x | {m['ttft']['median']:.0f} | {m['tpot']['median']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
