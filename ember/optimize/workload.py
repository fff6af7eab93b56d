"""The workload the optimizer tunes for: prompts, output lengths and arrival times.

From a file, one JSON record a line, either
- `ember bench serve`'s workload.jsonl records (ember.bench.serving.workloads), with an optional
  `arrival` (seconds from the start; absent: all at once), or
- the server's stored traces exported as JSONL (rows of ember.store.traces: `request` the body as sent,
  `usage`, `created_at`): the arrival is `created_at` from the first, the output length what the model
  produced;
or generated in one of three shapes: `chat` (short prompts and answers), `rag` (long prompts sharing a
few prefixes), `edit` (the answer copies the prompt: where n-gram speculation pays).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ember.bench.serving.runner import arrival_offsets
from ember.bench.serving.workloads import Request

SHAPES = ("chat", "rag", "edit")
# The copy-heavy shape's texts: plain English the model copies back (random word salad it would not).
_PASSAGES = (
    "The committee met on Tuesday to discuss the budget for the new library, which will open next spring "
    "near the river. Members agreed that the reading room should have more windows.",
    "Our bakery opens at seven every morning except Sunday. We sell fresh bread, croissants and seasonal "
    "fruit tarts, and we take orders for birthday cakes three days in advance.",
    "To reset the router, hold the small button on the back for ten seconds until the light turns orange. "
    "Wait two minutes for it to restart, then connect again with the password on the label.",
    "The train to the coast leaves from platform four at half past nine. Passengers with bicycles should use "
    "the last carriage, and tickets can be bought on board with a card.",
)
_EDITS = ("Repeat this text exactly:\n\n{}", "Copy this text word for word:\n\n{}")


@dataclass
class Item:
    """One request: a completion prompt, the tokens it generates, when it arrives (s from the start)."""

    id: str
    prompt: str
    max_tokens: int
    arrival: float = 0.0


@dataclass
class Workload:
    name: str
    items: list[Item]

    @property
    def key(self) -> str:
        """A digest of everything that shapes a replay: what a cached result is keyed by."""
        text = json.dumps([asdict(i) for i in self.items], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for i in self.items:
                f.write(json.dumps(asdict(i)) + "\n")


def load(path: str | Path, default_max_tokens: int = 16) -> Workload:
    """A workload file (see the module doc); a line that is neither record says which line and why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workload file {path} does not exist")
    items: list[Item] = []
    created: list[float | None] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if not isinstance(d, dict):
                    raise ValueError("a record is a JSON object")
                item, at = (
                    _trace(d, len(items)) if "request" in d else _bench(d, len(items), default_max_tokens)
                )
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                raise ValueError(f"{path}:{lineno}: not a workload record ({exc})") from None
            if item.max_tokens < 1:
                raise ValueError(f"{path}:{lineno}: max_tokens must be at least 1 (got {item.max_tokens})")
            items.append(item)
            created.append(at)
    if not items:
        raise ValueError(f"workload file {path} has no records")
    if all(c is not None for c in created):
        first = min(created)  # type: ignore[type-var]
        for item, c in zip(items, created, strict=True):
            item.arrival = float(c) - first  # type: ignore[operator]
    items.sort(key=lambda i: i.arrival)
    return Workload(path.stem, items)


def _bench(d: dict, index: int, default_max_tokens: int) -> tuple[Item, None]:
    r = Request(
        id=str(d.get("id", f"req-{index}")),
        max_tokens=int(d.get("max_tokens", default_max_tokens)),
        model=d.get("model", ""),
        prompt=d.get("prompt"),
        messages=d.get("messages"),
    )
    arrival = float(d.get("arrival", 0.0))
    if arrival < 0:
        raise ValueError(f"arrival must be >= 0 seconds (got {arrival})")
    return Item(r.id, r.as_prompt(), r.max_tokens, arrival), None


def _trace(d: dict, index: int) -> tuple[Item, float]:
    body = d["request"]
    r = Request(
        id=str(d.get("id", f"trace-{index}")),
        max_tokens=int((d.get("usage") or {}).get("completion_tokens") or body.get("max_tokens") or 16),
        model=body.get("model", ""),
        prompt=body.get("prompt"),
        messages=[
            {"role": m.get("role", "user"), "content": _text(m.get("content"))} for m in body["messages"]
        ]
        if "messages" in body
        else None,
    )
    return Item(r.id, r.as_prompt(), r.max_tokens), float(d["created_at"])


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if p.get("type") == "text")
    return content or ""


def generate(
    shape: str, *, num_requests: int = 24, rate: float = 4.0, output_len: int = 16, seed: int = 0, model: str
) -> Workload:
    """A synthetic workload of `shape` with Poisson arrivals at `rate` requests/s (inf: all at once)."""
    from ember.bench.serving.config import WorkloadConfig
    from ember.bench.serving.workloads import build_workload

    if shape not in SHAPES:
        raise ValueError(f"unknown workload shape '{shape}'; known: {', '.join(SHAPES)}")
    rng = np.random.default_rng(seed)
    if shape == "edit":
        prompts = [
            _EDITS[i % len(_EDITS)].format(_PASSAGES[int(rng.integers(len(_PASSAGES)))])
            for i in range(num_requests)
        ]
    else:
        kind = {"chat": "random", "rag": "shared-prefix"}[shape]
        cfg = WorkloadConfig(
            kind=kind,
            num_requests=num_requests,
            seed=seed,
            tokenizer=model,
            input_len=48,
            output_len=output_len,
            prefix_len=384,
            suffix_len=32,
            num_prefix_groups=2,
        )
        prompts = [r.as_prompt() for r in build_workload(cfg, model, "completions", seed)]
    offsets = arrival_offsets(num_requests, rate, 1.0, np.random.default_rng((seed, 1)))
    items = [
        Item(f"{shape}-{i}", p, output_len, float(t))
        for i, (p, t) in enumerate(zip(prompts, offsets, strict=True))
    ]
    return Workload(shape, items)
