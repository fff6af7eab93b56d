""" "It learns": a few minutes of LoRA SFT on 2 CPU cores teach the default model a task it fails, and DPO
makes it prefer the right answer on pairs it never saw.

    .venv/bin/python benchmarks/tune_learns.py            # writes benchmarks/TUNE_LEARNS.md and two PNGs

The task: rewrite a date written in one of seven styles ("March 3rd, 2021", "the 3rd of March 2021",
"03.03.2021", ...) as ISO 8601 ("2021-03-03"), checked by exact match. Train and held-out sets are drawn
with fixed seeds from disjoint dates. SFT trains on chat JSONL; the held-out exact match of the base model
and of the adapter is measured greedily with ember's `LLM`, the adapter loaded as the server loads it.
DPO trains on preference JSONL whose rejected answers are the usual mistakes (US order, month and day
swapped, the date left in words); `rewards/accuracies` on held-out pairs is measured independently with
PEFT on transformers (the adapter on vs off, as TRL computes it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import shutil
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
INSTRUCTION = "Rewrite the date as YYYY-MM-DD. Answer with the date only."  # the system message
MONTHS = [dt.date(2000, m, 1).strftime("%B") for m in range(1, 13)]


def ordinal(d: int) -> str:
    suffix = "th" if 11 <= d % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


STYLES = [
    lambda y, m, d: f"{MONTHS[m - 1]} {ordinal(d)}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{MONTHS[m - 1][:3]} {d}, {y}",
    lambda y, m, d: f"the {ordinal(d)} of {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{d:02d}.{m:02d}.{y}",
    lambda y, m, d: f"{MONTHS[m - 1]} {d} {y}",
    lambda y, m, d: f"{ordinal(d)} {MONTHS[m - 1][:3]}. {y}",
]


def dates(n: int, seed: int, exclude: set[dt.date] = frozenset()) -> list[tuple[str, dt.date]]:
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        day = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(365 * 100))
        if day in seen:
            continue
        seen.add(day)
        out.append((rng.choice(STYLES)(day.year, day.month, day.day), day))
    return out


def messages(text: str) -> list[dict]:
    # Short on purpose: on 2 CPU cores the trainer does tens of tokens a second, so tokens are minutes.
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": text}]


def wrong(rng: random.Random, day: dt.date, text: str) -> str:
    """A plausible wrong answer: US order, month and day swapped, or the date left as it was."""
    kinds = ["us", "words"] + (["swap"] if day.day <= 12 and day.day != day.month else [])
    kind = rng.choice(kinds)
    if kind == "us":
        return f"{day.month:02d}/{day.day:02d}/{day.year}"
    if kind == "swap":
        return f"{day.year}-{day.day:02d}-{day.month:02d}"
    return f"{MONTHS[day.month - 1]} {day.day}, {day.year}"


def write_sets(work: Path, n_train: int, n_pairs: int, n_test: int) -> dict[str, Path]:
    train = dates(n_train, seed=1)
    test = dates(n_test, seed=2, exclude={d for _, d in train})
    rng = random.Random(3)
    files = {
        "sft_train": [
            {"messages": [*messages(t), {"role": "assistant", "content": d.isoformat()}]} for t, d in train
        ],
        "sft_test": [{"messages": messages(t), "answer": d.isoformat()} for t, d in test],
        "dpo_train": [_pair(t, d, rng) for t, d in train[:n_pairs]],
        "dpo_test": [_pair(t, d, rng) for t, d in test],
    }
    work.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in files.items():
        paths[name] = work / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _pair(text: str, day: dt.date, rng: random.Random) -> dict:
    return {
        "input": {"messages": messages(text)},
        "preferred_output": [{"role": "assistant", "content": day.isoformat()}],
        "non_preferred_output": [{"role": "assistant", "content": wrong(rng, day, text)}],
    }


def tune(method: str, data: Path, out: Path, args: list[str]) -> tuple[str, float]:
    """Run `ember tune METHOD` in this process; -> (the command, seconds)."""
    from ember.cli import app

    argv = ["tune", method, "--model", MODEL, "--data", str(data), "--out", str(out), *args]
    started = time.perf_counter()
    app(argv, standalone_mode=False)
    return "ember " + " ".join(argv), time.perf_counter() - started


def exact_match(llm, test: list[dict], lora: str | None) -> tuple[float, list[str]]:
    from ember import SamplingParams

    prompts = [llm.tokenizer.apply_chat_template(row["messages"]) for row in test]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16), lora=lora)
    texts = [o.outputs[0].text.strip() for o in outs]
    return sum(t == row["answer"] for t, row in zip(texts, test, strict=True)) / len(test), texts


def reward_accuracy(adapter: str, pairs_path: Path, beta: float) -> dict:
    """TRL's rewards/accuracies and margins on `pairs_path`, with PEFT on transformers (float32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ember.models.catalog import resolve_model
    from ember.tokenizer import Tokenizer
    from ember.tune.data import load_dpo

    path = resolve_model(MODEL)
    pairs = load_dpo(pairs_path, Tokenizer.from_dir(path))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), adapter
    )
    model.eval()

    def logp(prompt: list[int], completion: list[int]) -> float:
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)  # [len(completion), vocab]
        return float(logits.gather(1, torch.tensor(completion)[:, None]).sum())

    chosen, rejected, base_prefers = [], [], 0
    for p in pairs:
        pol_c, pol_r = logp(p.prompt_ids, p.chosen_ids), logp(p.prompt_ids, p.rejected_ids)
        with model.disable_adapter():
            ref_c, ref_r = logp(p.prompt_ids, p.chosen_ids), logp(p.prompt_ids, p.rejected_ids)
        chosen.append(beta * (pol_c - ref_c))
        rejected.append(beta * (pol_r - ref_r))
        base_prefers += ref_c > ref_r
    n = len(pairs)
    return {
        "rewards/accuracies": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n,
        "rewards/margins": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / n,
        "base_prefers_chosen": base_prefers / n,
        "pairs": n,
    }


def _spread(metrics: list[dict]) -> str:
    speeds = sorted(m["tokens_per_s"] for m in metrics)
    return f"{speeds[0]:.0f} / {speeds[len(speeds) // 2]:.0f} / {speeds[-1]:.0f}"


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    import torch

    return f"{name}, {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ember-tune-learns"))
    ap.add_argument("--train", type=int, default=160, help="SFT examples")
    ap.add_argument("--pairs", type=int, default=64, help="DPO training pairs (dates from the SFT set)")
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument(
        "--sft-args", default="--epochs 1 --lr 1e-3 --batch-size 8 --rank 8 --alpha 16 --max-len 128"
    )
    ap.add_argument("--dpo-args", default="--epochs 1 --lr 5e-4 --batch-size 4 --beta 0.1 --max-len 128")
    ap.add_argument("--report", type=Path, default=HERE / "TUNE_LEARNS.md")
    a = ap.parse_args()

    shutil.rmtree(a.work, ignore_errors=True)
    paths = write_sets(a.work, a.train, a.pairs, a.test)
    test = [json.loads(line) for line in paths["sft_test"].read_text().splitlines()]
    sft_cmd, sft_s = tune("sft", paths["sft_train"], a.work / "sft", a.sft_args.split())
    dpo_cmd, dpo_s = tune("dpo", paths["dpo_train"], a.work / "dpo", a.dpo_args.split())

    from ember import LLM

    llm = LLM(MODEL, enable_lora=True, max_loras=2, seed=0)
    llm.add_lora("dates-sft", str(a.work / "sft" / "adapter"))
    llm.add_lora("dates-dpo", str(a.work / "dpo" / "adapter"))
    base, base_out = exact_match(llm, test, None)
    sft, sft_out = exact_match(llm, test, "dates-sft")
    dpo_em, _ = exact_match(llm, test, "dates-dpo")
    llm.close()
    beta = float(a.dpo_args.split("--beta")[1].split()[0]) if "--beta" in a.dpo_args else 0.1
    held = reward_accuracy(str(a.work / "dpo" / "adapter"), paths["dpo_test"], beta)

    for name in ("sft", "dpo"):
        shutil.copy(a.work / name / "loss.png", HERE / f"tune_learns_{name}_loss.png")
    sft_metrics = [json.loads(x) for x in (a.work / "sft" / "metrics.jsonl").read_text().splitlines()]
    dpo_metrics = [json.loads(x) for x in (a.work / "dpo" / "metrics.jsonl").read_text().splitlines()]
    sft_m = [m for m in sft_metrics if m["type"] == "metrics"]
    dpo_m = [m for m in dpo_metrics if m["type"] == "metrics"]
    examples = "\n".join(
        f"| `{row['messages'][-1]['content']}` | `{row['answer']}` | `{b}` | `{s}` |"
        for row, b, s in list(zip(test, base_out, sft_out, strict=True))[:8]
    )
    a.report.write_text(
        f"""# It learns: date normalisation with `ember tune`

{MODEL}, LoRA on all seven projections, float32 on {cpu()}; measured {time.strftime("%Y-%m-%d")}.
Task: rewrite a date written in one of seven styles as `YYYY-MM-DD`; {a.train} training examples,
{a.test} held-out ones on other dates (fixed seeds). Exact match, greedy, ember's engine with the adapter.

| | held-out exact match |
| --- | --- |
| base model | {base:.0%} |
| after SFT ({len(sft_m)} steps, {sft_s:.0f} s) | {sft:.0%} |
| gain | **{(sft - base) * 100:+.0f} points** |
| after DPO alone (for reference) | {dpo_em:.0%} |

DPO ({a.pairs} training pairs, {len(dpo_m)} steps, {dpo_s:.0f} s), measured on {held["pairs"]} held-out
pairs with PEFT on transformers (adapter on vs off):

| | held-out |
| --- | --- |
| rewards/accuracies | **{held["rewards/accuracies"]:.2f}** |
| rewards/margins | {held["rewards/margins"]:.3f} |
| base model prefers the chosen answer | {held["base_prefers_chosen"]:.2f} |
| last training step's rewards/accuracies | {dpo_m[-1].get("rewards/accuracies", float("nan")):.2f} |

Reproduce: `.venv/bin/python benchmarks/tune_learns.py` ({sft_s + dpo_s:.0f} s in the two
`ember tune` runs here, model loading included), which runs

    {sft_cmd.replace(str(a.work), "$WORK")}
    {dpo_cmd.replace(str(a.work), "$WORK")}

Trainer throughput per step (tokens/s, min / median / max): SFT {_spread(sft_m)}, DPO {_spread(dpo_m)}. The
2 cores are shared with other work on this machine; the spread is that, not the trainer.

SFT: train loss {sft_m[0]["train_loss"]:.3f} at step 1 -> {sft_m[-1]["train_loss"]:.3f} at step {len(sft_m)}.

![SFT loss](tune_learns_sft_loss.png)

DPO: loss {dpo_m[0]["train_loss"]:.3f} -> {dpo_m[-1]["train_loss"]:.3f}.

![DPO loss](tune_learns_dpo_loss.png)

First held-out examples:

| date | expected | base model | after SFT |
| --- | --- | --- | --- |
{examples}
"""
    )
    print(a.report.read_text())


if __name__ == "__main__":
    main()
