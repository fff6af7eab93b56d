"""What a tuning run shows while it runs (a progress bar fed by the trainer's events) and leaves behind in
its directory: `loss.png` (the loss curve), `metrics.jsonl` (every event) and `report.md`."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)


class RunLog:
    """The trainer's `on_event`: keeps every event and moves a rich progress bar (step, loss, tokens/s,
    ETA). Use as a context manager around `train`."""

    def __init__(self, out_dir: Path, title: str, show: bool = True):
        self.events: list[dict] = []
        self._file = Path(out_dir) / "metrics.jsonl"
        self._file.parent.mkdir(parents=True, exist_ok=True)
        self._file.write_text("")
        columns: list[ProgressColumn | str] = [
            TextColumn(f"[bold]{title}"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TaskProgressColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeRemainingColumn(),
        ]
        self._progress = Progress(*columns, disable=not show)
        self._task = self._progress.add_task(title, total=None, loss="-", speed="-")

    def __enter__(self) -> RunLog:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def __call__(self, event: dict) -> None:
        event = {**event, "time": time.time()}
        self.events.append(event)
        with self._file.open("a") as f:
            f.write(json.dumps(event, default=str) + "\n")
        if event.get("type") == "metrics":
            self._progress.update(
                self._task,
                completed=event["step"],
                total=event.get("total_steps"),
                loss=f"{event['train_loss']:.4f}",
                speed=f"{event.get('tokens_per_s', 0):.0f}",
            )

    @property
    def metrics(self) -> list[dict]:
        return [e for e in self.events if e.get("type") == "metrics"]


def plot_losses(metrics: list[dict], path: Path, title: str) -> Path:
    """Train loss per step, and validation loss where it was measured, in one PNG."""
    from matplotlib.figure import Figure  # without pyplot: no GUI backend, no global state

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot([m["step"] for m in metrics], [m["train_loss"] for m in metrics], label="train loss")
    valid = [m for m in metrics if m.get("valid_loss") is not None]
    if valid:
        ax.plot([m["step"] for m in valid], [m["valid_loss"] for m in valid], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_report(
    out_dir: Path, heading: str, config: Any, result: Any, metrics: list[dict], data: dict
) -> Path:
    """`report.md`: the data, the config, the steps, the final losses, the time and where the adapter is."""
    cfg = asdict(config) if is_dataclass(config) else dict(config)
    last = metrics[-1] if metrics else {}
    rows = [
        ("steps", result.steps),
        ("train loss (last step)", _num(result.train_loss)),
        ("validation loss", _num(result.valid_loss)),
        ("first step's train loss", _num(metrics[0]["train_loss"]) if metrics else "-"),
        ("token accuracy (last step)", _num(last.get("token_accuracy"))),
        ("tokens trained on", result.tokens),
        ("time", f"{result.seconds:.1f} s"),
        ("tokens/s", f"{result.tokens / max(result.seconds, 1e-9):.0f}"),
        ("adapter", f"`{result.adapter_dir}`"),
    ]
    rows += [(k, _num(v)) for k, v in sorted(result.metrics.items()) if k.startswith("rewards/")]
    lines = [f"# {heading}", ""]
    lines += [f"- {k}: `{v}`" for k, v in data.items()]
    lines += ["", "| result | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]
    lines += ["", "![loss curve](loss.png)", "", "## Config", "", "| field | value |", "| --- | --- |"]
    lines += [f"| {k} | `{v}` |" for k, v in cfg.items()]
    path = Path(out_dir) / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
