"""Workload shapes: seeded, of the lengths asked for (measured with the tokenizer), and replayable."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from ember.bench.serving.config import WorkloadConfig
from ember.bench.serving.prompts import PromptSampler
from ember.bench.serving.runner import fresh_seed
from ember.bench.serving.workloads import (
    Request,
    build_workload,
    load_workload,
    save_workload,
    zipf_choices,
)

KINDS = ("random", "shared-prefix", "chat", "multi-lora")


@pytest.fixture(scope="module")
def tokenizer_name(default_model_dir) -> str:
    return str(default_model_dir)


@pytest.fixture(scope="module")
def sampler(tokenizer_name) -> PromptSampler:
    return PromptSampler.for_model(tokenizer_name)


def _cfg(tokenizer_name: str, **kw) -> WorkloadConfig:
    small = dict(num_requests=12, input_len=24, output_len=8, prefix_len=40, suffix_len=6, num_turns=3)
    return WorkloadConfig(tokenizer=tokenizer_name, **(small | kw))


def _texts(requests: list[Request]) -> list[str]:
    return [r.as_prompt() for r in requests]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_workload(tokenizer_name, kind, endpoint):
    a = build_workload(_cfg(tokenizer_name, kind=kind), "m", endpoint, seed=7)
    b = build_workload(_cfg(tokenizer_name, kind=kind), "m", endpoint, seed=7)
    assert [r.to_json() for r in a] == [r.to_json() for r in b]
    assert len(a) == 12


@pytest.mark.parametrize("kind", KINDS)
def test_other_or_fresh_seeds_give_other_prompts(tokenizer_name, kind):
    seeds = [7, 8, fresh_seed(), fresh_seed()]
    assert len(set(seeds)) == 4
    workloads = [
        set(_texts(build_workload(_cfg(tokenizer_name, kind=kind), "m", "completions", s))) for s in seeds
    ]
    for i in range(len(workloads)):
        for j in range(i + 1, len(workloads)):
            assert not workloads[i] & workloads[j], f"seeds {seeds[i]} and {seeds[j]} share a prompt"


def test_random_lengths_are_exact_and_within_the_range(tokenizer_name, sampler):
    cfg = _cfg(tokenizer_name, kind="random", num_requests=40, input_len=40, output_len=20, range_ratio=0.5)
    requests = build_workload(cfg, "m", "completions", seed=3)
    measured = [sampler.count(r.prompt) for r in requests]
    assert measured == [r.input_len for r in requests]
    assert all(20 <= n <= 60 for n in measured)
    assert all(10 <= r.max_tokens <= 30 for r in requests)
    assert len(set(measured)) > 5 and len({r.max_tokens for r in requests}) > 5  # really spread


@pytest.mark.parametrize("n_tokens", [1, 2, 17, 300])
def test_prompt_text_has_exactly_the_tokens_asked_for(sampler, n_tokens):
    rng = np.random.default_rng(n_tokens)
    for _ in range(5):
        assert sampler.count(sampler.text(n_tokens, rng)) == n_tokens


def test_chat_endpoint_sends_the_prompt_as_one_user_message(tokenizer_name, sampler):
    (r,) = build_workload(_cfg(tokenizer_name, kind="random", num_requests=1), "m", "chat", seed=1)
    assert r.prompt is None and [m["role"] for m in r.messages] == ["user"]
    assert sampler.count(r.messages[0]["content"]) == r.input_len == 24


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_shared_prefix_groups_share_their_prefix_tokens(tokenizer_name, sampler, endpoint):
    cfg = _cfg(tokenizer_name, kind="shared-prefix", num_prefix_groups=3, prefix_len=40, suffix_len=6)
    requests = build_workload(cfg, "m", endpoint, seed=5)
    encode = sampler.tokenizer.encode
    heads: dict[int, set[tuple[int, ...]]] = {}
    for i, r in enumerate(requests):
        if endpoint == "chat":
            assert r.messages[0]["role"] == "system"
            ids = encode(r.messages[0]["content"], add_special_tokens=False)
            assert len(ids) == 40
        else:
            ids = encode(r.prompt, add_special_tokens=False)
            assert len(ids) == r.input_len == 40 + 6
        heads.setdefault(i % 3, set()).add(tuple(ids[:40]))
    assert all(len(h) == 1 for h in heads.values()), "members of a group differ in their prefix"
    assert len(set().union(*heads.values())) == 3, "two groups have the same prefix"
    assert len(set(_texts(requests))) == len(requests), "suffixes are not unique"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_chat_turns_resend_the_whole_history(tokenizer_name, endpoint):
    cfg = _cfg(tokenizer_name, kind="chat", num_requests=10, num_turns=3)
    requests = build_workload(cfg, "m", endpoint, seed=9)
    assert len(requests) == 10
    # turn-major: every session's turn 0 first, so sessions interleave
    assert [r.turn for r in requests] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    by_session: dict[str, list[Request]] = {}
    for r in requests:
        by_session.setdefault(r.session_id, []).append(r)
    assert len(by_session) == 4
    for turns in by_session.values():
        assert [t.turn for t in turns] == list(range(len(turns)))
        for prev, cur in zip(turns, turns[1:], strict=False):
            if endpoint == "chat":
                k = len(prev.messages)
                assert cur.messages[:k] == prev.messages
                assert [m["role"] for m in cur.messages[k:]] == ["assistant", "user"]
            else:
                assert cur.prompt.startswith(prev.prompt)
            assert cur.input_len > prev.input_len


def test_zipf_makes_adapter_zero_the_most_frequent():
    counts = np.bincount(zipf_choices(np.random.default_rng(0), 10, 1.1, 20000), minlength=10)
    assert list(counts[:5]) == sorted(counts[:5], reverse=True)
    assert counts[0] == counts.max()
    assert counts[0] > 3 * counts[9]


def test_multi_lora_names_adapters_with_a_zipf_skew(tokenizer_name):
    cfg = _cfg(tokenizer_name, kind="multi-lora", num_requests=400, input_len=4, num_adapters=8, zipf=1.1)
    requests = build_workload(cfg, "m", "completions", seed=2)
    counts = Counter(r.model for r in requests)
    assert set(counts) <= {f"lora-{i}" for i in range(8)}
    assert counts.most_common(1)[0][0] == "lora-0"
    assert counts["lora-0"] > counts["lora-1"] > counts["lora-3"]


@pytest.mark.parametrize("kind", ["random", "chat"])
def test_jsonl_round_trip_through_the_file_workload(tokenizer_name, tmp_path, kind):
    original = build_workload(_cfg(tokenizer_name, kind=kind), "m", "chat", seed=4)
    save_workload(original, tmp_path / "workload.jsonl")
    cfg = WorkloadConfig(kind="file", file=tmp_path / "workload.jsonl")
    replayed = build_workload(cfg, "other-model", "chat", seed=123)
    assert [r.to_json() for r in replayed] == [r.to_json() for r in original]
    first = WorkloadConfig(kind="file", file=tmp_path / "workload.jsonl", num_requests=3)
    assert [r.id for r in build_workload(first, "m", "chat", seed=0)] == [r.id for r in original[:3]]


def test_file_workload_accepts_minimal_lines(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [{"prompt": "hello there", "max_tokens": 5}, {"messages": [{"role": "user", "content": "hi"}]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b = load_workload(path, "served", default_max_tokens=32)
    assert (a.id, a.prompt, a.max_tokens, a.model) == ("req-0", "hello there", 5, "served")
    assert (b.id, b.max_tokens, b.as_prompt()) == ("req-1", 32, "hi")
    assert a.as_messages() == [{"role": "user", "content": "hello there"}]


def test_file_workload_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"max_tokens": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_workload(path, "m", 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_workload(tmp_path / "missing.jsonl", "m", 8)
