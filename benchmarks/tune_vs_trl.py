"""ember's LoRA SFT against TRL's SFTTrainer + PEFT (packing on), same model, data, LoRA and tokens per step.

Each side runs in its own subprocess, so peak memory (max RSS, getrusage) is its own. Throughput counts
every packed token (prompt and completion) over the timed steps, after `--warmup` untimed ones.

    python benchmarks/tune_vs_trl.py --steps 8 --dtype bfloat16   # writes benchmarks/TUNE.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_data(n: int, length: int, prompt: int, seed: int = 0) -> list[dict]:
    """Fixed-length examples (so both sides pack exactly `per_row` of them into a row)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(3, 49152, (length,), generator=g).tolist(), "prompt": prompt}
        for _ in range(n)
    ]


def run_ember(args, data) -> dict:
    from dataclasses import dataclass

    from ember.tune.trainer import TuneConfig, train

    @dataclass(frozen=True)
    class Example:
        input_ids: list[int]
        labels: list[bool]

    examples = [
        Example(d["input_ids"], [False] * d["prompt"] + [True] * (args.length - d["prompt"])) for d in data
    ]
    cfg = TuneConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        batch_size=args.rows * args.per_row,
        micro_batch_tokens=args.rows * args.max_length,
        max_len=args.max_length,
        dtype=args.dtype,
        checkpointing=args.checkpointing,
        learning_rate=1e-4,
        warmup_ratio=0.0,
    )
    stamps = []

    def on_event(e):
        if e["type"] == "metrics":
            stamps.append((time.perf_counter(), e["train_loss"]))

    t0 = time.perf_counter()
    train(args.model, examples, None, cfg, args.out + "/ember", on_event)
    return {"stamps": stamps, "start": t0}


def run_trl(args, data) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ember.models.catalog import resolve_model

    path = resolve_model(args.model)
    rows = [
        {
            "input_ids": d["input_ids"],
            "assistant_masks": [0] * d["prompt"] + [1] * (args.length - d["prompt"]),
        }
        for d in data
    ]
    stamps = []

    class Stamp(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                stamps.append((time.perf_counter(), logs["loss"]))

    bf16 = args.dtype == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    config = SFTConfig(
        output_dir=args.out + "/trl",
        packing=True,  # best-fit decreasing, padding-free (position_ids)
        max_length=args.max_length,
        per_device_train_batch_size=args.rows,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=1e-4,
        warmup_steps=0,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=bf16,
        gradient_checkpointing=args.checkpointing,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    lora = LoraConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=lora,
        callbacks=[Stamp()],
    )
    t0 = time.perf_counter()
    trainer.train()
    return {"stamps": stamps, "start": t0}


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_data(args.steps * args.rows * args.per_row, args.length, args.prompt)
    result = (run_ember if args.which == "ember" else run_trl)(args, data)
    stamps = result["stamps"]
    timed = stamps[args.warmup :]
    seconds = timed[-1][0] - stamps[args.warmup - 1][0] if args.warmup else timed[-1][0] - result["start"]
    tokens = len(timed) * args.rows * args.max_length
    out = {
        "tokens_per_s": tokens / seconds,
        "seconds_per_step": seconds / len(timed),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": [loss for _, loss in stamps],
    }
    print("RESULT " + json.dumps(out))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2, help="packed rows of max_length per step")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--length", type=int, default=256, help="tokens per example")
    ap.add_argument("--prompt", type=int, default=64, help="unsupervised prompt tokens per example")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    ap.add_argument("--which", choices=["ember", "trl"])
    ap.add_argument("--out", default="/tmp/tune_vs_trl")
    ap.add_argument("--report", default=str(ROOT / "benchmarks" / "TUNE.md"))
    args = ap.parse_args()
    args.per_row = args.max_length // args.length
    if args.which:
        return child(args)
    results = {}
    for which in ("ember", "trl"):
        cmd = [sys.executable, __file__, "--which", which] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{which} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        results[which] = json.loads(line[0][7:])
        print(which, results[which])
    e, t = results["ember"], results["trl"]
    lines = [
        "# LoRA SFT: ember vs TRL SFTTrainer + PEFT",
        "",
        f"CPU: {cpu_name()}, {__import__('os').cpu_count()} cores (shared with other work while measured). "
        f"Model {args.model}, {args.dtype}, LoRA r={args.r} alpha={2 * args.r} on all seven projections, "
        f"{args.rows} x {args.max_length} packed tokens per step ({args.rows * args.per_row} examples of "
        f"{args.length} tokens, {args.prompt} unsupervised), activation checkpointing "
        f"{'on' if args.checkpointing else 'off'} on both, {args.steps} steps of which {args.warmup} untimed, "
        f"{args.threads or 'default'} torch threads, one run.",
        "",
        "| trainer | tokens/s | s/step | peak RSS (MiB) |",
        "| --- | ---: | ---: | ---: |",
        f"| ember | {e['tokens_per_s']:.0f} | {e['seconds_per_step']:.2f} | {e['peak_rss_mib']:.0f} |",
        f"| TRL SFTTrainer + PEFT (packing=True, bfd, padding-free) | {t['tokens_per_s']:.0f} | "
        f"{t['seconds_per_step']:.2f} | {t['peak_rss_mib']:.0f} |",
        "",
        f"ember / TRL: **{e['tokens_per_s'] / t['tokens_per_s']:.2f}x** tokens/s, "
        f"{e['peak_rss_mib'] / t['peak_rss_mib']:.2f}x peak memory.",
        "",
        f"First-step losses: ember {e['losses'][0]:.4f}, TRL {t['losses'][0]:.4f} (same data, same init of B = 0).",
        "",
        f"Command: `python benchmarks/tune_vs_trl.py {' '.join(sys.argv[1:])}`",
    ]
    Path(args.report).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
