"""Datasets from stored traces: selection by tag, model, time and score (one tenant's only), exact and near
dedupe, relabelling with a fake caller, DPO pairs, files the trainer (ember.tune.data) reads; and the
route, through HTTP, with relabelling by a model of the server and by an OpenAI-compatible endpoint."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx
import pytest

from ember.flywheel.dataset import DatasetError, Selection, build, export, trainer_check
from ember.flywheel.dedupe import DedupeConfig
from ember.flywheel.relabel import RelabelError, endpoint_relabeller, server_relabeller
from ember.outputs import CompletionOutput, RequestOutput
from ember.server.app import ServerState
from ember.server.platform import BATCH_PRIORITY, CallResult, Platform
from ember.store.traces import traces
from ember.tune.data import load_dpo, load_sft
from tests.e2e.conftest import MODEL, running_server
from tests.fixtures_tokenizer import smollm2_tokenizer
from tests.traces.fake_chat import ChatEngine

A, B = "key-a", "key-b"
T0 = 1_700_000_000
LONG = "Summarise the customer's complaint about the late delivery of order {} in two sentences, politely."


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture
def platform(tmp_path):
    return Platform.open(tmp_path, f"sqlite:///{tmp_path}/ember.db", 1 << 20)


def add(platform, n: int, prompt: str, answer: str = "Sure.", tenant="t-a", **kw) -> str:
    """A stored completion as the recorder writes it."""
    tid = f"chatcmpl-{n}"
    finish = kw.pop("finish_reason", "stop")
    row = {
        "id": tid,
        "tenant": tenant,
        "created_at": kw.pop("created_at", T0 + n),
        "model": kw.pop("model", MODEL),
        "adapter": None,
        "stream": False,
        "request": {"model": MODEL, "messages": [{"role": "user", "content": prompt}]},
        "response": {
            "id": tid,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer, "refusal": None},
                    "finish_reason": finish,
                }
            ],
        },
        "metadata": kw.pop("metadata", {"task": "support"}),
        "usage": None,
        "latency_ms": 1.0,
        "ttft_ms": 1.0,
        "cached_tokens": 0,
        "score": kw.pop("score", None),
        "labels": [],
    }
    with platform.store.tx() as conn:
        conn.execute(traces.insert().values(**row))
    return tid


def run(coro):
    return asyncio.run(coro)


def test_selection_by_tag_model_time_and_score_of_one_tenant_only(platform):
    add(platform, 1, "one")
    add(platform, 2, "two", metadata={"task": "other"})
    add(platform, 3, "three", model="support-bot", score=0.9)
    add(platform, 4, "four", score=0.2)
    add(platform, 5, "five", tenant="t-b")  # another key's: never in t-a's datasets
    add(platform, 6, "six", finish_reason="length")
    add(platform, 7, "seven", created_at=T0 + 100)

    def ids(**kw) -> list[str]:
        return run(build(platform.store, "t-a", Selection(**kw))).trace_ids

    assert ids(metadata={"task": "support"}) == [f"chatcmpl-{i}" for i in (1, 3, 4, 7)]
    assert ids(model="support-bot") == ["chatcmpl-3"]
    assert ids(since=T0 + 2, until=T0 + 50, metadata={"task": "support"}) == ["chatcmpl-3", "chatcmpl-4"]
    assert ids(min_score=0.5) == ["chatcmpl-3"]
    assert ids(include_truncated=True, since=T0 + 6, until=T0 + 7) == ["chatcmpl-6"]
    assert ids(limit=3, metadata={"task": "support"}) == [
        "chatcmpl-3",
        "chatcmpl-4",
        "chatcmpl-7",
    ]  # scored, newest
    assert run(build(platform.store, "t-b", Selection())).trace_ids == ["chatcmpl-5"]
    counts = run(build(platform.store, "t-a", Selection())).counts
    assert counts["selected"] == 6 and counts["truncated"] == 1 and counts["written"] == 5
    with pytest.raises(DatasetError, match="created_before"):
        Selection(since=T0 + 5, until=T0 + 5)


def test_exact_and_near_duplicate_prompts_keep_the_best_scored(platform):
    add(platform, 1, LONG.format(1234), score=0.1)
    add(platform, 2, "  " + LONG.format(1234).upper(), score=0.8)  # exact, once normalised; better score
    add(platform, 3, LONG.format(1235))  # near: one digit differs
    add(platform, 4, "Write a haiku about the sea at night, with the moon in it.")
    near = run(build(platform.store, "t-a", Selection(), dedupe_config=DedupeConfig(near_threshold=0.8)))
    assert near.trace_ids == ["chatcmpl-2", "chatcmpl-4"]
    assert (near.counts["exact_duplicates"], near.counts["near_duplicates"]) == (1, 1)
    exact = run(build(platform.store, "t-a", Selection(), dedupe_config=DedupeConfig(near_threshold=None)))
    assert exact.trace_ids == ["chatcmpl-2", "chatcmpl-3", "chatcmpl-4"]


def test_the_exported_file_is_a_fine_tuning_file_the_trainer_reads(platform, tok):
    add(platform, 1, "What is 2+2?", "4.")
    add(platform, 2, "Name a colour.", "Blue.")
    dataset = run(build(platform.store, "t-a", Selection(), check=trainer_check(tok, "sft")))
    row = export(platform, "t-a", dataset, "support.jsonl")
    assert (row["purpose"], row["tenant"], row["filename"]) == ("fine-tune", "t-a", "support.jsonl")
    data = platform.blobs.path(row["id"]).read_bytes()
    assert row["bytes"] == len(data)
    lines = [json.loads(line) for line in data.splitlines()]
    assert lines[0] == {
        "messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    }
    assert len(load_sft(data, tok)) == 2
    empty = run(build(platform.store, "t-a", Selection(metadata={"task": "none"})))
    with pytest.raises(DatasetError, match="empty"):
        export(platform, "t-a", empty, "x.jsonl")


def _fake_call(answers: dict[str, str], seen: list):
    """A PlatformContext.call that answers each prompt from `answers` (a 404 for those not in it)."""

    async def call(path: str, body: dict, tenant, priority: int) -> CallResult:
        seen.append((path, body["model"], tenant, priority))
        prompt = body["messages"][-1]["content"]
        if prompt not in answers:
            return CallResult(404, {"error": {"message": "model 'strong' does not exist"}})
        message = {"role": "assistant", "content": answers[prompt]}
        return CallResult(200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

    return call


def test_relabel_makes_sft_data_from_the_stronger_answers(platform, tok):
    add(platform, 1, "What is 2+2?", "5.")
    add(platform, 2, "Name a colour.", "Blue.")
    add(platform, 3, "Unanswerable?", "Hm.")
    seen: list = []
    strong = server_relabeller(
        _fake_call({"What is 2+2?": "4.", "Name a colour.": "Red."}, seen), "strong", "t-a"
    )
    dataset = run(build(platform.store, "t-a", Selection(), relabel=strong, check=trainer_check(tok, "sft")))
    answers = [line["messages"][-1]["content"] for line in dataset.lines]
    assert answers == ["4.", "Red."] and dataset.counts["relabel_failed"] == 1
    assert {s for s in seen} == {("/v1/chat/completions", "strong", "t-a", BATCH_PRIORITY)}


def test_dpo_pairs_prefer_the_stronger_answer_and_skip_equal_ones(platform, tok):
    add(platform, 1, "What is 2+2?", "5.")
    add(platform, 2, "Name a colour.", "Blue.")
    strong = server_relabeller(
        _fake_call({"What is 2+2?": "4.", "Name a colour.": " blue. "}, []), "s", "t-a"
    )
    dataset = run(
        build(platform.store, "t-a", Selection(), "dpo", relabel=strong, check=trainer_check(tok, "dpo"))
    )
    assert dataset.lines == [
        {
            "input": {"messages": [{"role": "user", "content": "What is 2+2?"}]},
            "preferred_output": [{"role": "assistant", "content": "4."}],
            "non_preferred_output": [{"role": "assistant", "content": "5."}],
        }
    ]
    assert dataset.counts["same_answer"] == 1
    row = export(platform, "t-a", dataset, "dpo.jsonl")
    assert len(load_dpo(platform.blobs.path(row["id"]).read_bytes(), tok)) == 1
    with pytest.raises(DatasetError, match="relabel"):
        run(build(platform.store, "t-a", Selection(), "dpo"))


def test_a_relabeller_error_is_a_relabel_error():
    async def broken(*_):
        return CallResult(200, {"choices": [{"message": {"role": "assistant", "content": ""}}]})

    with pytest.raises(RelabelError, match="empty"):
        run(server_relabeller(broken, "s", None)([{"role": "user", "content": "x"}], None))


# -- the route -------------------------------------------------------------------------------------------


class TwoVoices(ChatEngine):
    """Answers `<prompt> / <adapter>`: the base and an adapter say different things."""

    async def generate(self, prompt, params, request_id=None, *, lora=None, **_):
        text = f"answer by {lora or 'base'}"
        out = CompletionOutput(0, text, [1], "stop", delta_text=text)
        yield RequestOutput(request_id, None, list(prompt), [out], finished=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("flywheel")
    platform = Platform.open(root, f"sqlite:///{root}/ember.db", 1 << 20)
    state = ServerState(api_keys=[A, B], admin_key="admin", platform=platform)
    with running_server(TwoVoices({"strong": "/adapters/strong"}), state) as url:
        for key, prompt in ((A, "How do I reset my password?"), (A, "Where is my order?"), (B, "B's secret")):
            chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "store": True}
            r = httpx.post(
                url + "/v1/chat/completions",
                json={**chat, "metadata": {"task": "support"}},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 200, r.text
        yield url


def post(url: str, body: dict, key: str = A) -> httpx.Response:
    return httpx.post(
        url + "/v1/flywheel/datasets", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def content(url: str, file_id: str, key: str = A) -> list[dict]:
    r = httpx.get(url + f"/v1/files/{file_id}/content", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.content.splitlines()]


def test_a_key_exports_its_own_traces_and_never_another_keys(server):
    made = post(server, {"metadata": {"task": "support"}})
    assert made.status_code == 200, made.text
    body = made.json()
    assert body["object"] == "flywheel.dataset" and body["file"]["purpose"] == "fine-tune"
    prompts = [line["messages"][0]["content"] for line in content(server, body["file"]["id"])]
    assert prompts == ["How do I reset my password?", "Where is my order?"]
    theirs = post(server, {"metadata": {"task": "support"}}, key=B).json()
    assert [line["messages"][0]["content"] for line in content(server, theirs["file"]["id"], B)] == [
        "B's secret"
    ]
    assert (
        httpx.get(
            server + f"/v1/files/{body['file']['id']}", headers={"Authorization": f"Bearer {B}"}
        ).status_code
        == 404
    )


def test_the_route_relabels_with_a_model_of_the_server_and_makes_dpo_pairs(server):
    made = post(server, {"method": "dpo", "relabel": {"model": "strong"}, "filename": "pairs.jsonl"})
    assert made.status_code == 200, made.text
    lines = content(server, made.json()["file"]["id"])
    assert [
        (x["preferred_output"][0]["content"], x["non_preferred_output"][0]["content"]) for x in lines
    ] == [("answer by strong", "answer by base")] * 2
    same = post(server, {"method": "dpo", "relabel": {"model": MODEL}})  # the served model: nothing to prefer
    assert same.status_code == 400 and "same_answer 2" in same.json()["error"]["message"]


def test_an_external_endpoint_relabels_for_the_admin_only(server):
    relabel = {"model": "strong", "base_url": server + "/v1", "api_key": A}
    refused = post(server, {"relabel": relabel})
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "relabel.base_url"
    made = post(server, {"relabel": relabel}, key="admin")  # the admin's own traces: none
    assert made.status_code == 400 and made.json()["error"]["code"] == "empty_dataset"

    async def ask(model: str, key: str) -> dict | RelabelError:
        relabel, close = endpoint_relabeller(server + "/v1", model, key)
        try:
            return await relabel([{"role": "user", "content": "hi"}], None)
        except RelabelError as exc:
            return exc
        finally:
            await close()

    assert run(ask("strong", A)) == {"role": "assistant", "content": "answer by strong"}
    assert "answered 401" in str(run(ask("strong", "wrong")))
    assert "answered 404" in str(run(ask("nope", A)))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"method": "ppo"}, "method"),
        ({"method": "dpo"}, "relabel"),
        ({"dedupe": {"near_threshold": 2}}, "dedupe.near_threshold"),
        ({"relabel": {"model": "x", "base_url": "file:///etc"}}, "relabel.base_url"),
        ({"created_after": 10, "created_before": 5}, "created_before"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_requests_are_400_naming_the_field(server, body, param):
    r = post(server, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_counts_sum_up(server):
    counts = Counter(post(server, {"dedupe": {"near_threshold": None}}).json()["counts"])
    assert counts["selected"] == 2 and counts["written"] == 2
