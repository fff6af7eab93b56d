"""The requests of a run: synthetic shapes drawn from a seed, or a JSONL file written by an earlier run.

Every shape is static: it is fully built before the first request goes out (chat replies included),
so the same seed replays the same bytes, and `workload.jsonl` replays a run on another server.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ember.bench.serving.config import WorkloadConfig
from ember.bench.serving.prompts import PromptSampler

DEFAULT_NUM_REQUESTS = 100


@dataclass
class Request:
    """One request to send: a prompt for /v1/completions or messages for /v1/chat/completions."""

    id: str
    max_tokens: int
    model: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    input_len: int | None = None  # tokens of content, as the tokenizer counted them when built
    session_id: str | None = None  # chat: turns of one session go out one after another
    turn: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(f"request {self.id}: give exactly one of prompt or messages")

    def as_prompt(self) -> str:
        """The text for /v1/completions; messages are joined, so a chat workload still resends history."""
        if self.prompt is not None:
            return self.prompt
        return "\n\n".join(m["content"] for m in self.messages or [])

    def as_messages(self) -> list[dict[str, str]]:
        return self.messages if self.messages is not None else [{"role": "user", "content": self.prompt}]

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def build_workload(cfg: WorkloadConfig, model: str, endpoint: str, seed: int) -> list[Request]:
    """The requests `cfg` describes, as `endpoint` ("completions" or "chat") takes them."""
    if cfg.kind == "file":
        assert cfg.file is not None  # checked by WorkloadConfig
        requests = load_workload(cfg.file, model, cfg.output_len)
        return requests[: cfg.num_requests] if cfg.num_requests else requests
    n = cfg.num_requests or DEFAULT_NUM_REQUESTS
    rng = np.random.default_rng(seed)
    sampler = PromptSampler.for_model(cfg.tokenizer)
    chat = endpoint == "chat"
    if cfg.kind == "random":
        return _random(sampler, rng, cfg, n, model, chat)
    if cfg.kind == "shared-prefix":
        return _shared_prefix(sampler, rng, cfg, n, model, chat)
    if cfg.kind == "chat":
        return _multi_turn(sampler, rng, cfg, n, model, chat)
    if cfg.kind == "multi-lora":
        adapters = zipf_choices(rng, cfg.num_adapters, cfg.zipf, n)
        requests = _random(sampler, rng, cfg, n, model, chat)
        for r, a in zip(requests, adapters, strict=True):
            r.model = f"{cfg.adapter_prefix}-{a}"
        return requests
    raise ValueError(f"unknown workload '{cfg.kind}'")


def lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> np.ndarray:
    """Uniform integers in [mean*(1-r), mean*(1+r)], as vLLM's random dataset draws them."""
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def zipf_choices(rng: np.random.Generator, num: int, s: float, n: int) -> np.ndarray:
    """n draws from {0..num-1} with P(i) proportional to 1/(i+1)^s: adapter 0 is the hottest."""
    weights = 1.0 / np.arange(1, num + 1) ** s
    return rng.choice(num, size=n, p=weights / weights.sum())


def _one(rid: str, text: str, n_tokens: int, max_tokens: int, model: str, chat: bool) -> Request:
    if chat:
        return Request(
            rid, max_tokens, model, messages=[{"role": "user", "content": text}], input_len=n_tokens
        )
    return Request(rid, max_tokens, model, prompt=text, input_len=n_tokens)


def _random(
    sampler: PromptSampler, rng, cfg: WorkloadConfig, n: int, model: str, chat: bool
) -> list[Request]:
    ins = lengths(rng, cfg.input_len, cfg.range_ratio, n)
    outs = lengths(rng, cfg.output_len, cfg.range_ratio, n)
    return [
        _one(f"req-{i}", sampler.text(int(li), rng), int(li), int(lo), model, chat)
        for i, (li, lo) in enumerate(zip(ins, outs, strict=True))
    ]


def _shared_prefix(
    sampler: PromptSampler, rng, cfg: WorkloadConfig, n: int, model: str, chat: bool
) -> list[Request]:
    prefixes = [sampler.text(cfg.prefix_len, rng) for _ in range(cfg.num_prefix_groups)]
    outs = lengths(rng, cfg.output_len, cfg.range_ratio, n)
    requests = []
    for i in range(n):
        prefix, suffix = prefixes[i % len(prefixes)], sampler.text(cfg.suffix_len, rng)
        if chat:
            messages = [{"role": "system", "content": prefix}, {"role": "user", "content": suffix}]
            size = sampler.count(prefix) + sampler.count(suffix)
            requests.append(Request(f"req-{i}", int(outs[i]), model, messages=messages, input_len=size))
        else:
            # The suffix starts a new word, so the prefix's tokens stay exactly the same in every prompt.
            text = prefix + " " + suffix
            requests.append(
                Request(f"req-{i}", int(outs[i]), model, prompt=text, input_len=sampler.count(text))
            )
    return requests


def _multi_turn(
    sampler: PromptSampler, rng, cfg: WorkloadConfig, n: int, model: str, chat: bool
) -> list[Request]:
    """Sessions of `num_turns`, each turn resending the whole history; listed turn-major (every
    session's turn 0, then every turn 1) so sessions interleave, and cut at n requests."""
    sessions = math.ceil(n / cfg.num_turns)
    grid: list[list[Request]] = []
    for s in range(sessions):
        history: list[dict[str, str]] = []
        ins = lengths(rng, cfg.input_len, cfg.range_ratio, cfg.num_turns)
        outs = lengths(rng, cfg.output_len, cfg.range_ratio, cfg.num_turns)
        turns = []
        for k in range(cfg.num_turns):
            history.append({"role": "user", "content": sampler.text(int(ins[k]), rng)})
            messages = [dict(m) for m in history]
            r = Request(f"s{s}-t{k}", int(outs[k]), model, messages=messages, session_id=f"s{s}", turn=k)
            if chat:
                r.input_len = sum(sampler.count(m["content"]) for m in messages)
            else:
                r.prompt, r.messages = r.as_prompt(), None
                r.input_len = sampler.count(r.prompt)
            turns.append(r)
            # The reply the model "gave": synthetic, so the workload is fixed before anything is sent.
            history.append({"role": "assistant", "content": sampler.text(cfg.output_len, rng)})
        grid.append(turns)
    return [grid[s][k] for k in range(cfg.num_turns) for s in range(sessions)][:n]


def save_workload(requests: list[Request], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps(r.to_json()) + "\n")


def load_workload(path: Path, model: str, default_max_tokens: int) -> list[Request]:
    """Records as `save_workload` writes them, or minimal lines: {"prompt": ...} or {"messages": [...]},
    with `max_tokens` optional (default: `default_max_tokens`) and `model` defaulting to `model`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workload file {path} does not exist; pass a workload.jsonl from a run")
    requests = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                requests.append(
                    Request(
                        id=str(d.get("id", f"req-{len(requests)}")),
                        max_tokens=int(d.get("max_tokens", default_max_tokens)),
                        model=d.get("model", model),
                        prompt=d.get("prompt"),
                        messages=d.get("messages"),
                        input_len=d.get("input_len"),
                        session_id=d.get("session_id"),
                        turn=d.get("turn"),
                    )
                )
            except (ValueError, TypeError, AttributeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a workload record ({exc})") from exc
    if not requests:
        raise ValueError(f"workload file {path} has no records")
    return requests
