"""Graded examples, what a router learns from: an input and, per candidate, how well it answered (0..1).

From a JSONL file, one example a line:

    {"input": "What is 7 * 8?", "scores": {"small": 0, "large": 1},
     "usage": {"small": {"prompt_tokens": 12, "completion_tokens": 3}, ...},    # optional
     "metadata": {"family": "arithmetic"}}                                      # optional, kept as is

or from stored eval runs, one run per candidate over the same items (the run's model names the candidate;
an item passed is 1, failed is 0; an item any run errored on says nothing about quality and is left out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ember.router.model import RouterError


@dataclass(frozen=True)
class GradedExample:
    input: str
    scores: dict[str, float]  # candidate -> score in [0, 1]
    usage: dict[str, dict[str, int]] = field(default_factory=dict)  # candidate -> {prompt_tokens, ...}
    metadata: dict = field(default_factory=dict)  # what the grader knew (task family, ...), for analysis

    def to_dict(self) -> dict:
        line = {"input": self.input, "scores": self.scores, "usage": self.usage, "metadata": self.metadata}
        return {k: v for k, v in line.items() if v or k in ("input", "scores")}


def parse_example(data, where: str) -> GradedExample:
    """One example from its JSON value; `where` names it in the error (`file.jsonl line 3`)."""
    if not isinstance(data, dict):
        raise RouterError(f"{where}: expected an object {{input, scores}}, got {type(data).__name__}")
    unknown = set(data) - {"input", "scores", "usage", "metadata"}
    if unknown:
        raise RouterError(
            f"{where}: unknown field '{sorted(unknown)[0]}'; known: input, scores, usage, metadata"
        )
    text, scores, usage = data.get("input"), data.get("scores"), data.get("usage") or {}
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise RouterError(f"{where}: 'metadata' must be an object")
    if not isinstance(text, str):
        raise RouterError(f"{where}: 'input' must be a string")
    if not isinstance(scores, dict) or not scores:
        raise RouterError(f"{where}: 'scores' must be an object {{candidate: score}} with at least one entry")
    for name, score in scores.items():
        if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
            raise RouterError(f"{where}: scores.{name} must be a number in [0, 1], got {score!r}")
    if not isinstance(usage, dict) or any(
        not isinstance(u, dict)
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in u.values())
        for u in usage.values()
    ):
        raise RouterError(f"{where}: 'usage' must be {{candidate: {{prompt_tokens, completion_tokens}}}}")
    return GradedExample(text, {k: float(v) for k, v in scores.items()}, usage, metadata)


def load_jsonl(path: str | Path) -> list[GradedExample]:
    """Every example of a JSONL file; a bad line raises RouterError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise RouterError(f"no examples file {path}")
    examples = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RouterError(f"{where}: not JSON ({exc.msg})") from exc
            examples.append(parse_example(data, where))
    if not examples:
        raise RouterError(f"{path} has no examples")
    return examples


def write_jsonl(examples: list[GradedExample], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(e.to_dict()) + "\n" for e in examples))


def from_eval_runs(store, run_ids: list[str]) -> list[GradedExample]:
    """Examples from eval runs of the same items, one run per candidate (its model), joined on the item."""
    from ember.evals.sampling import messages_for
    from ember.store import evals as rows

    by_idx: dict[int, GradedExample] = {}
    for run_id in run_ids:
        run = rows.get(store, rows.runs, run_id)
        if run is None:
            raise RouterError(f"no eval run '{run_id}'")
        if not run["model"]:
            raise RouterError(f"eval run '{run_id}' sampled no model (its source is not `completions`)")
        source = run["data_source"]
        for it in _done_items(store, run_id):
            if it["status"] not in ("pass", "fail"):
                continue
            old = by_idx.get(it["idx"])
            if old is None:
                messages = messages_for(source["input_messages"], it["item"]["item"])
                text = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") != "assistant")
                old = by_idx[it["idx"]] = GradedExample(text, {}, {})
            old.scores[run["model"]] = float(it["status"] == "pass")
            usage = (it["sample"] or {}).get("usage") or {}
            old.usage[run["model"]] = {
                k: usage[k] for k in ("prompt_tokens", "completion_tokens") if k in usage
            }
    models = {rows.get(store, rows.runs, r)["model"] for r in run_ids}
    if len(models) != len(run_ids):
        raise RouterError("each eval run must sample a different model: the model names the candidate")
    # An item some run errored on cannot be compared across the candidates: it is left out.
    return [by_idx[i] for i in sorted(by_idx) if len(by_idx[i].scores) == len(models)]


def _done_items(store, run_id: str) -> list[dict]:
    import sqlalchemy as sa

    from ember.store import evals as rows

    t = rows.items
    query = (
        sa.select(t.c.idx, t.c.item, t.c.status, t.c.sample)
        .where(t.c.run_id == run_id, t.c.done.is_(True))
        .order_by(t.c.idx)
    )
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]
