"""What `ember optimize` writes to --out: front.md (and the same table on the terminal), front.png (the
Pareto front in 3D, predicted and measured), spec.yaml (the pick, for `ember serve --config`), report.md
(the choice explained: what binds, what the runner-up gives up, how wrong the predictions were)."""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from ember.config import EngineConfig
from ember.optimize.objective import Objective
from ember.optimize.replay import write_spec
from ember.optimize.search import Outcome

SHOWN = ("ttft_p50", "ttft_p95", "tpot_p50", "tpot_p95", "goodput", "cost", "quality")
ERRORS = ("ttft_p50", "ttft_p95", "tpot_p50", "tpot_p95", "goodput")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def error(pred: dict, meas: dict, metric: str) -> float:
    """(predicted - measured) / measured."""
    p, m = pred.get(metric), meas.get(metric)
    if p is None or m is None or not m or math.isnan(p) or math.isnan(m):
        return math.nan
    return (p - m) / m


def name(out: Outcome, key: str) -> str:
    return "(default)" if key == out.baseline else out.by_key[key].label()


def rows(out: Outcome) -> list[tuple[str, list[str]]]:
    """(key, cells) for the front and every measured config: predicted / measured per metric."""
    keys = list(dict.fromkeys([*out.measured, *out.front]))
    table = []
    for k in keys:
        p, m = out.predicted[k], out.measured.get(k, {})
        tags = [
            t
            for t, on in (("pick", k == out.pick), ("default", k == out.baseline), ("front", k in out.front))
            if on
        ]
        cells = [name(out, k), ",".join(tags)]
        cells += [f"{_fmt(p.get(x))} / {_fmt(m.get(x))}" if m else _fmt(p.get(x)) for x in SHOWN]
        table.append((k, cells))
    return table


def header() -> list[str]:
    return ["config", "", *SHOWN]


def rich_table(out: Outcome) -> Table:
    t = Table(title="Pareto front and measured configs: predicted / measured (ms, req/s, $/M tokens)")
    for h in header():
        t.add_column(h)
    for _, cells in rows(out):
        t.add_row(*cells)
    return t


def markdown_table(out: Outcome) -> str:
    lines = ["| " + " | ".join(header()) + " |", "|" + " --- |" * len(header())]
    lines += ["| " + " | ".join(cells) + " |" for _, cells in rows(out)]
    return "\n".join(lines) + "\n"


def error_table(out: Outcome) -> str:
    lines = [
        "| config | " + " | ".join(f"{x} err" for x in ERRORS) + " |",
        "|" + " --- |" * (len(ERRORS) + 1),
    ]
    entries = list(out.measured.items())
    if out.uncalibrated is not None:
        entries.insert(0, ("uncalibrated", out.measured[out.baseline]))
    for k, m in entries:
        pred = out.uncalibrated if k == "uncalibrated" else out.predicted[k]
        label = "(default, before calibration)" if k == "uncalibrated" else name(out, k)
        errs = [f"{e:+.0%}" if not math.isnan(e := error(pred, m, x)) else "-" for x in ERRORS]
        lines.append(f"| {label} | " + " | ".join(errs) + " |")
    return "\n".join(lines) + "\n"


def plot(out: Outcome, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(7, 6))
    ax = fig.add_subplot(projection="3d")
    for keys, marker, label, source in (
        ([k for k in out.predicted if k not in out.front], ".", "predicted", out.predicted),
        (out.front, "o", "front (predicted)", out.predicted),
        (list(out.measured), "^", "measured", out.measured),
    ):
        pts = [(source[k]["quality"], source[k][out.latency], source[k]["cost"]) for k in keys]
        pts = [p for p in pts if all(math.isfinite(x) for x in p)]
        if pts:
            q, lat, cost = zip(*pts, strict=True)
            ax.scatter(q, lat, cost, marker=marker, label=label, alpha=0.4 if marker == "." else 0.9)
    if out.pick:
        m = out.measured[out.pick]
        ax.scatter([m["quality"]], [m[out.latency]], [m["cost"]], marker="*", s=200, c="red", label="pick")
    ax.set_xlabel("quality")
    ax.set_ylabel(f"{out.latency} (ms)")
    ax.set_zlabel("cost ($/M tokens)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def explain(out: Outcome, objective: Objective) -> str:
    """The choice in words: the pick, the constraint that binds it, what the runner-up gives up."""
    if out.pick is None:
        return f"No measured configuration meets the objective: {out.infeasible}.\n"
    m = out.measured[out.pick]
    goal = objective.goal
    lines = [f"**Pick:** {name(out, out.pick)} — measured {goal} {_fmt(m.get(goal))}."]
    if objective.constraints:
        slack = {
            str(c): (c.value - m[c.metric]) / (abs(c.value) or 1) * (1 if c.op == "<=" else -1)
            for c in objective.constraints
        }
        binding = min(slack, key=slack.get)
        lines.append(f"**Binding constraint:** {binding} (least slack: {slack[binding]:.0%} of its bound).")
    base = out.measured.get(out.baseline)
    if base is not None and out.baseline != out.pick:
        lines.append(
            f"**Against the default `ember serve`:** {goal} {_fmt(base.get(goal))} measured; "
            f"feasible: {'yes' if objective.feasible(base) else 'no'}."
        )
    others = sorted(
        (k for k in out.measured if k != out.pick), key=lambda k: objective.score(out.measured[k])
    )
    if others:
        r = out.measured[others[0]]
        gives = ", ".join(f"{x} {_fmt(r.get(x))} vs {_fmt(m.get(x))}" for x in (goal, out.latency, "quality"))
        lines.append(
            f"**Runner-up:** {name(out, others[0])} — {gives} "
            f"(feasible: {'yes' if objective.feasible(r) else 'no'})."
        )
    return "\n\n".join(lines) + "\n"


def write(
    out: Outcome, objective: Objective, base: EngineConfig, directory: Path, context: str
) -> Path | None:
    """Every output file; returns the spec's path (None when nothing was feasible)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "front.md").write_text(markdown_table(out))
    plot(out, directory / "front.png")
    spec = None
    if out.pick is not None:
        spec = directory / "spec.yaml"
        write_spec(out.by_key[out.pick].engine(base), spec)
    p50 = [
        abs(error(out.predicted[k], m, x))
        for k, m in out.measured.items()
        if out.calibration is None or k != out.baseline  # the calibration point proves nothing
        for x in ("ttft_p50", "tpot_p50")
    ]
    p50 = [e for e in p50 if not math.isnan(e)]
    text = [
        f"# ember optimize\n\n{context}\n\nObjective: `{objective}`\n",
        f"{len(out.predicted)} configurations predicted, {len(out.measured)} measured by real replays.\n",
        explain(out, objective),
        "## Front and measured configurations (predicted / measured)\n",
        markdown_table(out),
        "\n## Prediction error ((predicted - measured) / measured)\n",
        (
            f"The default's replay calibrated the profile: step times x{out.calibration:.3g} (the machine "
            "now against when it was profiled; so the default's TPOT p50 is close by construction). Its "
            "prediction before calibration is the first row.\n\n"
        )
        if out.calibration is not None
        else "",
        error_table(out),
        f"\nMean |error| at p50 (TTFT, TPOT{', the default left out' if out.calibration else ''}): "
        f"{sum(p50) / len(p50):.0%}\n"
        if p50
        else "",
        f"\nServe the pick: `ember serve --config {spec}`\n" if spec else "",
    ]
    (directory / "report.md").write_text("\n".join(text))
    return spec
