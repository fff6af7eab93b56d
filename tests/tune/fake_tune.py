"""Stand-ins for ember.tune.data and ember.tune.trainer with the contract's names and shapes, fast: the
API's tests run jobs through the real worker process with these (`--data`/`--trainer`).

FAKE_STEP_S (environment): seconds per fake step, for tests that act while a job runs."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    def __init__(self, message: str, line: int | None = None):
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


class TrainingCancelled(Exception):
    pass


def _rows(path) -> list[dict]:
    out = []
    for n, text in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON ({exc.msg})", n) from None
        if not isinstance(row, dict) or not ("messages" in row or "preferred_output" in row):
            raise DataError("expected 'messages' or 'input'/'preferred_output'/'non_preferred_output'", n)
        out.append(row)
    return out


def detect_method(path) -> str:
    return "dpo" if "preferred_output" in _rows(path)[0] else "sft"


def load_sft(path, tokenizer, max_len=None) -> list:
    rows = _rows(path)
    if not any(m.get("role") == "assistant" for r in rows for m in r.get("messages", [])):
        raise DataError("no example has a supervised token (no assistant message)")
    return rows


def load_dpo(path, tokenizer, max_len=None) -> list:
    return _rows(path)


@dataclass
class TuneConfig:
    method: str = "sft"
    r: int = 8
    lora_alpha: int = 16
    target_modules: list = field(default_factory=list)
    epochs: int = 1
    learning_rate: float = 2e-4
    batch_size: int = 8
    beta: float = 0.1
    max_len: int = 1024
    seed: int = 0


@dataclass
class TrainResult:
    adapter_dir: str
    steps: int
    train_loss: float
    valid_loss: float | None
    tokens: int
    seconds: float
    metrics: dict


def train(model, train_data, valid_data, cfg, out_dir, on_event=None, should_stop=None) -> TrainResult:
    total = -(-len(train_data) // cfg.batch_size) * cfg.epochs
    pause = float(os.environ.get("FAKE_STEP_S", "0"))
    for step in range(1, total + 1):
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"cancelled before step {step}")
        time.sleep(pause)
        event = {"type": "metrics", "step": step, "total_steps": total, "train_loss": 2.0 / step}
        event |= {"token_accuracy": 0.5, "lr": cfg.learning_rate, "tokens_per_s": 100.0}
        if valid_data:
            event["valid_loss"] = 2.5 / step
        on_event(event)
        if step == total:
            ckpt = Path(out_dir) / f"checkpoint-{step}"
            ckpt.mkdir(parents=True, exist_ok=True)
            on_event({"type": "checkpoint", "step": step, "path": str(ckpt), "metrics": event})
    adapter = Path(out_dir) / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": cfg.r, "lora_alpha": cfg.lora_alpha}))
    return TrainResult(str(adapter), total, 2.0 / total, None, 10 * len(train_data), 0.01, {})
