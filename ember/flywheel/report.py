"""A flywheel run's report in markdown, written whether the candidate was promoted or not: the data it
trained on, the job, each criterion with its interval, the latency guard and the decision with its reasons.
"""

from __future__ import annotations

import time

from ember.flywheel.gate import p50


def render(run: dict) -> str:
    spec, decision = run["spec"], run["decision"] or {}
    promoted = run["promoted"]
    if run["status"] == "failed":
        verdict = f"**Failed** at {run['step']}: {run['failure']['message']}"
    elif promoted:
        verdict = (
            f"**Promoted**: `{spec['alias']}` now serves `{run['candidate']}` (version {promoted['version']})"
        )
    else:
        verdict = f"**Not promoted**: `{spec['alias']}` keeps serving what it served"
    lines = [f"# Flywheel run {run['id']}", "", verdict, ""]
    for reason in decision.get("reasons", []):
        lines.append(f"- {reason}")
    if decision.get("reasons"):
        lines.append("")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(run["created_at"]))
    lines += [f"Alias `{spec['alias']}`, started {when}.", ""]
    data = run["dataset"]
    if data:
        where = ", ".join(f"{k}={v}" for k, v in (spec["traces"].get("metadata") or {}).items()) or "all"
        relabel = spec.get("relabel_with")
        lines += [
            "## Data",
            "",
            f"{data['examples']} training examples (file `{data['file_id']}`) from {data['selected']} stored "
            f"completions tagged {where}"
            + (f", answers relabelled by `{relabel['model']}`" if relabel else ", answers as served")
            + ".",
            "",
        ]
    if run["job_id"]:
        lines += [
            "## Tuning",
            "",
            f"Fine-tuning job `{run['job_id']}` -> candidate `{run['candidate']}`.",
            "",
        ]
    comparison = run["comparison"]
    if comparison:
        base = run["baseline"] or {}
        serves = base.get("serves") or {}
        what = (
            f"adapter `{serves['adapter']}`"
            if serves.get("adapter")
            else f"base model `{serves.get('model')}`"
        )
        lines += [
            "## Evaluation",
            "",
            f"{comparison['items']} held-out items; baseline: `{spec['alias']}` at version "
            f"{base.get('version')} ({what}); candidate: `{run['candidate']}`. "
            f"Paired bootstrap, {comparison['confidence']:.0%} interval.",
            "",
            "| criterion | baseline | candidate | difference | interval |",
            "| --- | --- | --- | --- | --- |",
        ]
        for c in comparison["criteria"]:
            if c["diff"] is None:
                lines.append(f"| {c['name']} | - | - | - | no item scored on both sides |")
                continue
            lines.append(
                f"| {c['name']} | {c['mean_a']:.3f} | {c['mean_b']:.3f} | {c['diff']:+.3f} | "
                f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] |"
            )
        latency = comparison.get("latency_ms") or {}
        a, b = p50(latency.get("a", [])), p50(latency.get("b", []))
        if a is not None and b is not None:
            lines.append(f"| latency p50 (ms) | {a:.0f} | {b:.0f} | {b - a:+.0f} | |")
        lines.append("")
    if decision.get("checks"):
        lines += ["## Gate", "", "| check | kind | passed | detail |", "| --- | --- | --- | --- |"]
        for c in decision["checks"]:
            lines.append(f"| {c['name']} | {c['kind']} | {'yes' if c['passed'] else 'no'} | {c['detail']} |")
        lines.append("")
    steps = [(name, s) for name, s in run["steps"].items() if s.get("finished_at")]
    if steps:
        lines += ["## Steps", "", "| step | seconds | |", "| --- | --- | --- |"]
        for name, s in steps:
            lines.append(f"| {name} | {s['finished_at'] - s['started_at']:.0f} | {s.get('detail') or ''} |")
        lines.append("")
    return "\n".join(lines)
