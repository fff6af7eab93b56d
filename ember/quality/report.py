"""The fidelity report: one row per setting (agreement, KL, speed against the float32 reference) as a
rich table for the terminal, markdown and JSON."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path

from rich.table import Table

from ember.quality.fidelity import Fidelity

COLUMNS = ("setting", "agreement", "KL mean", "KL p99", "same sequence", "tok/s", "float32 tok/s", "speedup")


def cpu_name() -> str:
    """The CPU's model name (every benchmark says which CPU it ran on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def setting_name(result: Fidelity) -> str:
    return f"{result.quantization or 'none'} / {result.dtype}"


def rows(results: list[Fidelity]) -> list[tuple[str, ...]]:
    """The table's cells, as text, one tuple per setting in COLUMNS order."""
    out = []
    for r in results:
        out.append(
            (
                setting_name(r),
                f"{r.agreement:.3f}",
                f"{r.kl_mean:.4f}",
                f"{r.kl_p99:.4f}",
                f"{r.sequence_agreement:.2f}",
                f"{r.tokens_per_s:.1f}",
                f"{r.reference_tokens_per_s:.1f}",
                f"{r.speedup:.2f}x",
            )
        )
    return out


def summary(results: list[Fidelity]) -> str:
    r = results[0]
    return (
        f"model `{r.model}`, {r.prompts} prompts x up to {r.max_tokens} tokens ({r.tokens} positions), "
        f"against the float32 unquantized reference; CPU: {cpu_name()}"
    )


def table(results: list[Fidelity]) -> Table:
    t = Table(title="fidelity vs the float32 reference", caption=summary(results).replace("`", ""))
    for i, name in enumerate(COLUMNS):
        t.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows(results):
        t.add_row(*row)
    return t


def markdown(results: list[Fidelity], command: str) -> str:
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    lines = [
        "# Fidelity report",
        "",
        f"{summary(results)}; {date} UTC.",
        "",
        f"Command: `{command}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| --- |" + " ---: |" * (len(COLUMNS) - 1),
        *("| " + " | ".join(row) + " |" for row in rows(results)),
        "",
        "agreement: fraction of positions where the setting's greedy choice is the reference's token, fed the "
        "reference's tokens (teacher forcing); KL: KL(reference || setting) of the next-token distributions "
        "in nats; same sequence: fraction of prompts whose greedy continuation is identical; tok/s: one "
        "sequence decoding alone, model steps only, the setting and the reference on the same tokens; "
        "speedup: the median over prompts of reference time / setting time, each pair timed back to back.",
        "",
    ]
    return "\n".join(lines)


def write(results: list[Fidelity], out: Path, command: str) -> dict[str, Path]:
    """fidelity.md and fidelity.json under `out` (made if missing) -> their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "fidelity.md", "json": out / "fidelity.json"}
    paths["markdown"].write_text(markdown(results, command))
    body = {"cpu": cpu_name(), "command": command, "results": [r.to_json() for r in results]}
    paths["json"].write_text(json.dumps(body, indent=2) + "\n")
    return paths
