"""Datasets from traces: stored chat completions selected by tag, model, time and feedback score, without
exact or near-duplicate prompts, optionally relabelled by a stronger model, written as a fine-tuning JSONL
file (/v1/files, purpose fine-tune) in the formats ember.tune.data reads:

- SFT: `{"messages": [...prompt, answer], "tools"?, "parallel_tool_calls"?}` with the served answer, or
  the stronger model's when relabelled;
- DPO: `{"input": {"messages", "tools"?}, "preferred_output": [stronger], "non_preferred_output":
  [served]}`; a pair whose answers are the same (normalised) teaches nothing and is skipped.

A dataset is made of one tenant's traces only (ember.traces.query.select takes the tenant).
"""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from dataclasses import dataclass, field

from ember.flywheel.dedupe import DedupeConfig, dedupe, normalise
from ember.flywheel.relabel import RelabelError, Relabeller, relabel_all
from ember.server.platform import Platform
from ember.store import db
from ember.traces.query import select

MAX_TRACES = 100_000  # read at most this many traces for one dataset (the oldest that match)
METHODS = ("sft", "dpo")


class DatasetError(ValueError):
    """The dataset cannot be made as asked (nothing matched, DPO without a relabeller)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Selection:
    """Which traces: every `metadata` pair among the trace's tags; `model` as the client named it (an
    alias, an adapter, the base); `since` <= created_at < `until` (unix seconds); feedback score at least
    `min_score` (traces without a score left out); at most `limit` examples after dedupe (the best
    scored, then the newest, first). Answers cut at max_tokens are left out unless `include_truncated`."""

    metadata: dict[str, str] | None = None
    model: str | None = None
    since: int | None = None
    until: int | None = None
    min_score: float | None = None
    limit: int | None = None
    include_truncated: bool = False

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise DatasetError(f"limit must be at least 1 (got {self.limit})", "limit")
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise DatasetError(
                "the time range is empty: created_before must be after created_after", "created_before"
            )


@dataclass
class Example:
    """One stored completion as a training example: the prompt and the answer that was served."""

    trace_id: str
    seq: int  # the trace's row order: the order it was stored in
    created_at: int
    score: float | None
    messages: list[dict]
    tools: list[dict] | None
    parallel_tool_calls: bool | None
    served: dict  # the assistant message: role, content, tool_calls?


@dataclass
class Dataset:
    method: str
    lines: list[dict]
    trace_ids: list[str]  # the trace of each line
    counts: Counter = field(default_factory=Counter)  # what was selected, dropped and why, written


def prompt_text(example: Example) -> str:
    """The prompt as one text, what duplicates are judged on: each message's role and text."""
    parts = []
    for m in example.messages:
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text") or "" for p in content if isinstance(p, dict))
        parts.append(f"{m.get('role')}: {content or ''}")
    return "\n".join(parts)


def _assistant(message: dict) -> dict | None:
    """The assistant message as a training line has it, or None if it says nothing."""
    out = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        out["tool_calls"] = message["tool_calls"]
    return out if out["content"] or out.get("tool_calls") else None


def example_of(row: dict, include_truncated: bool = False) -> tuple[Example | None, str | None]:
    """(the example of a trace row, None) or (None, why it is no example: unanswered, truncated)."""
    choices = row["response"].get("choices") or []
    if not choices or not isinstance(choices[0].get("message"), dict):
        return None, "unanswered"
    if choices[0].get("finish_reason") == "length" and not include_truncated:
        return None, "truncated"
    served = _assistant(choices[0]["message"])
    messages = row["request"].get("messages")
    if served is None or not isinstance(messages, list) or not messages:
        return None, "unanswered"
    request = row["request"]
    example = Example(
        row["id"],
        row["seq"],
        row["created_at"],
        row["score"],
        messages,
        request.get("tools") or None,
        request.get("parallel_tool_calls"),
        served,
    )
    return example, None


def select_examples(
    store: db.Store, tenant: str | None, selection: Selection, counts: Counter
) -> list[Example]:
    """`tenant`'s traces that `selection` takes, as examples, oldest first; `counts` says what was left
    out and why."""
    rows = select(
        store,
        tenant,
        metadata=selection.metadata,
        model=selection.model,
        since=selection.since,
        until=selection.until,
        min_score=selection.min_score,
        limit=MAX_TRACES,
    )
    counts["selected"] += len(rows)
    out = []
    for row in rows:
        example, why = example_of(row, selection.include_truncated)
        if example is None:
            counts[why] += 1
        else:
            out.append(example)
    return out


def choose(
    store: db.Store, tenant: str | None, selection: Selection, config: DedupeConfig, counts: Counter
) -> list[Example]:
    """The examples a dataset is made of: selected, deduplicated (of duplicates, the best scored is kept,
    then the newest), at most `selection.limit`; oldest first."""
    examples = select_examples(store, tenant, selection, counts)
    examples.sort(key=lambda e: (e.score is None, -(e.score or 0.0), -e.seq))
    deduped = dedupe(examples, prompt_text, config)
    counts["exact_duplicates"], counts["near_duplicates"] = deduped.exact, deduped.near
    kept = deduped.kept
    if selection.limit is not None and len(kept) > selection.limit:
        counts["over_limit"] = len(kept) - selection.limit
        kept = kept[: selection.limit]
    return sorted(kept, key=lambda e: e.seq)


def _same(a: dict, b: dict) -> bool:
    return normalise(a.get("content") or "") == normalise(b.get("content") or "") and a.get(
        "tool_calls"
    ) == b.get("tool_calls")


def sft_line(example: Example, answer: dict) -> dict:
    line: dict = {"messages": [*example.messages, answer]}
    if example.tools:
        line["tools"] = example.tools
        if example.parallel_tool_calls is not None:
            line["parallel_tool_calls"] = example.parallel_tool_calls
    return line


def dpo_line(example: Example, chosen: dict, rejected: dict) -> dict:
    prompt: dict = {"messages": example.messages}
    if example.tools:
        prompt["tools"] = example.tools
    return {"input": prompt, "preferred_output": [chosen], "non_preferred_output": [rejected]}


async def build(
    store: db.Store,
    tenant: str | None,
    selection: Selection,
    method: str = "sft",
    dedupe_config: DedupeConfig | None = None,
    relabel: Relabeller | None = None,
    concurrency: int = 4,
    check=None,  # line -> None, or raises (ember.tune.data's DataError): lines the trainer refuses
) -> Dataset:
    """The dataset of `tenant`'s traces that `selection` takes. With `relabel`, SFT trains on the stronger
    model's answers and DPO prefers them to the served ones (DPO needs it)."""
    if method not in METHODS:
        raise DatasetError(f"method must be one of {', '.join(METHODS)} (got {method!r})", "method")
    if method == "dpo" and relabel is None:
        raise DatasetError("DPO pairs need a stronger model to prefer: give relabel", "relabel")
    counts: Counter = Counter()
    kept = await asyncio.to_thread(choose, store, tenant, selection, dedupe_config or DedupeConfig(), counts)
    answers: list[dict | RelabelError] = [e.served for e in kept]
    if relabel is not None:
        answers = await relabel_all(relabel, [(e.messages, e.tools) for e in kept], concurrency)
    dataset = Dataset(method, [], [], counts)
    await asyncio.to_thread(_write_lines, dataset, kept, answers, check)  # the checks tokenize: off the loop
    return dataset


def _write_lines(dataset: Dataset, kept: list[Example], answers: list, check) -> None:
    counts = dataset.counts
    for example, answer in zip(kept, answers, strict=True):
        if isinstance(answer, RelabelError):
            counts["relabel_failed"] += 1
            continue
        if dataset.method == "dpo":
            if _same(answer, example.served):
                counts["same_answer"] += 1
                continue
            line = dpo_line(example, answer, example.served)
        else:
            line = sft_line(example, answer)
        if check is not None:
            try:
                check(line)
            except ValueError:
                counts["refused_by_trainer"] += 1
                continue
        dataset.lines.append(line)
        dataset.trace_ids.append(example.trace_id)
    counts["written"] = len(dataset.lines)


def trainer_check(tokenizer, method: str):
    """A `check` for `build`: each line read as the trainer reads it (DataError if it would refuse it)."""
    from ember.tune.data import load_dpo, load_sft

    load = load_dpo if method == "dpo" else load_sft
    return lambda line: load([json.dumps(line)], tokenizer)


def export(platform: Platform, tenant: str | None, dataset: Dataset, filename: str) -> dict:
    """The dataset as a file of `tenant` (purpose fine-tune): its files row. An empty dataset is refused."""
    if not dataset.lines:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(dataset.counts.items()) if v) or "no traces matched"
        raise DatasetError(f"the dataset would be empty ({dropped})")
    data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in dataset.lines).encode()
    file_id = db.new_id("file")
    size, digest = platform.blobs.write(file_id, io.BytesIO(data), len(data))
    row = {
        "id": file_id,
        "tenant": tenant,
        "filename": filename,
        "purpose": "fine-tune",
        "bytes": size,
        "sha256": digest,
        "created_at": db.now(),
        "expires_at": None,
    }
    return platform.store.insert(db.files, row)
