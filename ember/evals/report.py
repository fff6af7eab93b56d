"""The report of an eval: a markdown table of every criterion's mean with its confidence interval (and,
for two models, the difference and whether B is better), a PNG plot of the same, and the full results
as JSON (every item, sample and grade, both orderings of a pairwise judge included)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

# Figure without pyplot: no GUI backend, no global state, safe on headless machines.
from matplotlib.figure import Figure

from ember.evals.compare import Comparison
from ember.evals.evaluate import Evaluation


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _ci(low: float | None, high: float | None) -> str:
    return "—" if low is None else f"[{low:.3f}, {high:.3f}]"


def markdown(result: Evaluation | Comparison, title: str) -> str:
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    pct = round(100 * result.confidence)
    head = [f"# {title}", "", f"{len(result.items)} items; {date} UTC; {pct}% percentile-bootstrap intervals "
            f"({result.n_boot} resamples, seed {result.seed}).", ""]  # fmt: skip
    if isinstance(result, Comparison):
        head += [
            f"A = `{result.model_a}`, B = `{result.model_b}`; diff = mean B - mean A, paired by item.",
            "",
        ]
        rows = [
            f"| criterion | type | n | errored | mean A {pct}% CI | mean B {pct}% CI | diff {pct}% CI | B better |",
            "| --- | --- | ---: | ---: | --- | --- | --- | --- |",
        ]
        for c in result.criteria:
            a = f"{_num(c.mean_a)} {_ci(*(c.ci_a or (None, None)))}"
            b = f"{_num(c.mean_b)} {_ci(*(c.ci_b or (None, None)))}"
            d = f"{_num(c.diff)} {_ci(c.ci_low, c.ci_high)}"
            better = "yes" if c.improved else "no"
            rows.append(f"| {c.name} | {c.type} | {c.n} | {c.errored} | {a} | {b} | {d} | {better} |")
    else:
        head += [f"model `{result.model}`", ""]
        rows = [
            f"| criterion | type | n | errored | passed | failed | mean | {pct}% CI |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for c in result.criteria:
            s = c["ember"]
            rows.append(
                f"| {c['testing_criteria']} | {c['type']} | {s['n']} | {s['errored']} | {c['passed']} | "
                f"{c['failed']} | {_num(s['mean'])} | {_ci(s['ci_low'], s['ci_high'])} |"
            )
    return "\n".join([*head, *rows, ""])


def figure(result: Evaluation | Comparison, title: str) -> Figure:
    """Each criterion's mean with its interval as error bars; for two models a second panel with the
    difference and its interval against zero."""
    pairs = isinstance(result, Comparison)
    fig = Figure(figsize=(11 if pairs else 6, 4), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(1, 2 if pairs else 1, squeeze=False)[0]
    if pairs:
        names = [c.name for c in result.criteria]
        x = list(range(len(names)))
        for offset, label, means, cis in (
            (
                -0.2,
                f"A: {result.model_a}",
                [c.mean_a for c in result.criteria],
                [c.ci_a for c in result.criteria],
            ),
            (
                0.2,
                f"B: {result.model_b}",
                [c.mean_b for c in result.criteria],
                [c.ci_b for c in result.criteria],
            ),
        ):
            _bars(axes[0], [i + offset for i in x], means, cis, label, width=0.4)
        axes[0].set_title("mean score per criterion")
        ax = axes[1]
        diffs = [c.diff for c in result.criteria]
        _bars(
            ax,
            x,
            diffs,
            [(c.ci_low, c.ci_high) if c.ci_low is not None else None for c in result.criteria],
            "B - A",
        )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title("difference B - A (paired)")
        for a in axes:
            a.set_xticks(x, names, rotation=20)
            a.legend()
    else:
        names = [c["testing_criteria"] for c in result.criteria]
        stats = [c["ember"] for c in result.criteria]
        cis = [(s["ci_low"], s["ci_high"]) if s["ci_low"] is not None else None for s in stats]
        _bars(axes[0], list(range(len(names))), [s["mean"] for s in stats], cis, result.model)
        axes[0].set_xticks(list(range(len(names))), names, rotation=20)
        axes[0].set_title("mean score per criterion")
        axes[0].legend()
    return fig


def _bars(ax, x: list[float], means: list, cis: list, label: str, width: float = 0.6) -> None:
    heights = [m if m is not None else 0.0 for m in means]
    low = [m - ci[0] if ci else 0.0 for m, ci in zip(heights, cis, strict=True)]
    high = [ci[1] - m if ci else 0.0 for m, ci in zip(heights, cis, strict=True)]
    ax.bar(x, heights, width=width, yerr=[low, high], capsize=4, label=label)


def write(result: Evaluation | Comparison, out_dir: str | Path, title: str) -> dict[str, Path]:
    """report.md, report.png and results.json under `out_dir`; their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "plot": out / "report.png", "json": out / "results.json"}
    text = markdown(result, title)
    paths["markdown"].write_text(text + f"\n![{title}](report.png)\n")
    figure(result, title).savefig(paths["plot"], dpi=110)
    paths["json"].write_text(json.dumps(result.as_dict(), indent=1, default=str))
    return paths
