"""Virtual keys, limits, budgets and usage through the HTTP API and the unmodified openai SDK, over a
fake engine (the model is irrelevant here), each against SQLite and a real PostgreSQL (tests.postgres)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from ember.config import ServerConfig
from ember.gateway.usage import PriceTable
from ember.server.app import ServerState, create_app
from ember.server.platform import Platform
from tests.server.fake_engine import FakeEngine
from tests.server.fakes import serving

MODEL = "fake-model"
ADMIN = "admin-secret-key"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
PRICES = {
    "models": {MODEL: {"input": 1.0, "cached_input": 0.5, "output": 2.0, "training": 3.0}},
    "batch_discount": 0.5,
}


class SlowEngine(FakeEngine):
    """FakeEngine that takes `delay` s per request and counts the requests it holds at once."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay = delay
        self.running = 0
        self.most = 0

    async def generate(self, prompt, params, request_id=None, **kw):
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.delay)
            async for out in super().generate(prompt, params, request_id, **kw):
                yield out
        finally:
            self.running -= 1


def make_app(tmp_path, url: str, engine=None, api_keys=(), name="a"):
    platform = Platform.open(tmp_path / name, url, 1 << 20)
    state = ServerState(api_keys=list(api_keys), admin_key=ADMIN, platform=platform)
    state.prices = PriceTable.parse(PRICES)
    return create_app(engine or SlowEngine(), MODEL, state)


@contextlib.contextmanager
def client(tmp_path, url: str, **kw):
    with TestClient(make_app(tmp_path, url, **kw)) as http:
        yield http


def new_key(http, **settings) -> dict:
    r = http.post("/v1/keys", json=settings, headers=ADMIN_H)
    assert r.status_code == 200, r.text
    return r.json()


def sdk(http, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


def complete(http, key: str, **body):
    return sdk(http, key).completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2, **body)


def usage_of(http, key: str = ADMIN, **query) -> dict:
    r = http.get("/v1/usage", params=query, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()


# -- keys --------------------------------------------------------------------------------------------


def test_create_list_update_revoke(tmp_path, database_url):
    with client(tmp_path, database_url) as http:
        made = new_key(http, name="ci", team="search", models=[MODEL], rpm=10)
        secret = made.pop("key")
        assert secret.startswith("sk-ember-") and made["id"].startswith("vk-")
        listed = http.get("/v1/keys", headers=ADMIN_H).json()["data"]
        assert [k["id"] for k in listed] == [made["id"]]
        assert all(secret not in str(k) and "key_hash" not in k for k in listed)  # shown once only
        assert complete(http, secret).usage.completion_tokens == 2
        r = http.post(f"/v1/keys/{made['id']}", json={"rpm": 20, "team": "ads"}, headers=ADMIN_H)
        assert r.json()["rpm"] == 20 and r.json()["team"] == "ads"
        assert http.post(f"/v1/keys/{made['id']}", json={"rpm": -1}, headers=ADMIN_H).status_code == 400
        assert http.post("/v1/keys", json={"colour": "red"}, headers=ADMIN_H).status_code == 400
        assert http.post(f"/v1/keys/{made['id']}/revoke", headers=ADMIN_H).json()["revoked"] is True
        with pytest.raises(openai.AuthenticationError) as refused:
            complete(http, secret)
        assert "revoked" in refused.value.message and secret not in refused.value.message
        assert http.get("/v1/keys/vk-nope", headers=ADMIN_H).status_code == 404
        # The keys API is the admin's: a virtual key may not use it.
        assert http.get("/v1/keys", headers={"Authorization": f"Bearer {secret}"}).status_code == 401


def test_once_a_key_exists_every_request_needs_one(tmp_path):
    with client(tmp_path, f"sqlite:///{tmp_path}/ember.db") as http:
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": [1]}).status_code == 200
        new_key(http)
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": [1]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_api_key_flags_keep_working_and_are_metered(tmp_path):
    with client(tmp_path, f"sqlite:///{tmp_path}/ember.db", api_keys=["static-key"]) as http:
        new_key(http)
        complete(http, "static-key")
        state = http.app.state.ember
        rows = usage_of(http, "static-key")["data"]
        assert [(r["key_id"], r["requests"]) for r in rows] == [(state.tenant("static-key"), 1)]


def test_a_model_the_key_may_not_call(tmp_path):
    with client(tmp_path, f"sqlite:///{tmp_path}/ember.db") as http:
        secret = new_key(http, models=["other-model"])["key"]
        with pytest.raises(openai.PermissionDeniedError) as refused:
            complete(http, secret)
        assert refused.value.code == "model_not_allowed"


def test_revoked_stops_at_once_on_every_replica(tmp_path, database_url):
    """Two servers on one database: a key revoked on one is refused by the other within the cache's 1 s."""
    with client(tmp_path, database_url, name="a") as a, client(tmp_path, database_url, name="b") as b:
        made = new_key(a)
        assert complete(b, made["key"]).usage.completion_tokens == 2  # b reads a's key
        assert a.post(f"/v1/keys/{made['id']}/revoke", headers=ADMIN_H).status_code == 200
        with pytest.raises(openai.AuthenticationError):  # at once on the replica that revoked it
            complete(a, made["key"])
        deadline = time.monotonic() + 1.5
        while True:
            try:
                complete(b, made["key"])
            except openai.AuthenticationError:
                break
            assert time.monotonic() < deadline, "the other replica still serves a revoked key"
            time.sleep(0.05)


def test_keys_and_usage_survive_a_restart(tmp_path):
    url = f"sqlite:///{tmp_path}/ember.db"
    with client(tmp_path, url) as http:
        made = new_key(http, budget=1000)
        complete(http, made["key"])
    with client(tmp_path, url) as http:
        complete(http, made["key"])
        assert usage_of(http)["total"]["requests"] == 2
        assert http.get(f"/v1/keys/{made['id']}", headers=ADMIN_H).json()["spend"]["spent"] == 6


# -- limits ------------------------------------------------------------------------------------------


def test_rate_limit_headers_over_http(tmp_path):
    with client(tmp_path, f"sqlite:///{tmp_path}/ember.db") as http:
        secret = new_key(http, rpm=2, tpm=1000)["key"]
        ok = sdk(http, secret).completions.with_raw_response.create(
            model=MODEL, prompt=[1, 2, 3], max_tokens=2
        )
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
        assert ok.headers["x-ratelimit-remaining-requests"] == "1"
        assert ok.headers["x-ratelimit-limit-tokens"] == "1000"
        assert ok.headers["x-ratelimit-remaining-tokens"] == "995"  # the estimate: 3 prompt + 2 output
        complete(http, secret)
        with pytest.raises(openai.RateLimitError) as refused:
            complete(http, secret)
        h = refused.value.response.headers
        assert refused.value.code == "rate_limit_exceeded"
        assert h["x-ratelimit-remaining-requests"] == "0" and 55 <= int(h["retry-after"]) <= 60
        assert h["x-ratelimit-reset-requests"].endswith("s")


@pytest.mark.slow
def test_60_rpm_key_driven_at_120_rpm_for_a_real_minute(tmp_path):
    """The real clock: one request every 0.5 s for 60 s against a 60 RPM key gets 60 ± 3 answers."""
    with client(tmp_path, f"sqlite:///{tmp_path}/ember.db") as http:
        secret = new_key(http, rpm=60)["key"]
        answered = refused = 0
        start = time.monotonic()
        for i in range(120):
            time.sleep(max(0.0, start + i * 0.5 - time.monotonic()))
            r = http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": [1], "max_tokens": 1},
                headers={"Authorization": f"Bearer {secret}"},
            )
            if r.status_code == 200:
                answered += 1
            else:
                assert r.status_code == 429 and r.headers["x-ratelimit-remaining-requests"] == "0"
                assert int(r.headers["retry-after"]) >= 1
                refused += 1
        assert 57 <= answered <= 63 and answered + refused == 120


# -- budgets -----------------------------------------------------------------------------------------


def test_budget_holds_under_64_concurrent_requests(tmp_path, database_url):
    """64 requests at once against a budget of N tokens: the spend ends at most N plus the requests in
    flight when it ran out (here at most one request's reservation over N), and the rest get 429
    budget_exceeded naming the budget."""
    budget = 40  # each request: 1 prompt token + 2 output tokens = 3; reserved at 3 + 2 = 5
    engine = SlowEngine(delay=0.05)
    app = make_app(tmp_path, database_url, engine=engine)
    with serving(app, ServerConfig(port=0)) as (host, port):
        base = f"http://{host}:{port}"
        made = httpx.post(base + "/v1/keys", json={"budget": budget}, headers=ADMIN_H).json()

        async def drive():
            async with httpx.AsyncClient(base_url=base, timeout=30) as h:
                body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}
                auth = {"Authorization": f"Bearer {made['key']}"}
                return await asyncio.gather(
                    *(h.post("/v1/completions", json=body, headers=auth) for _ in range(64))
                )

        answers = asyncio.run(drive())
        ok = [r for r in answers if r.status_code == 200]
        over = [r for r in answers if r.status_code != 200]
        assert ok and over
        for r in over:
            err = r.json()["error"]
            assert r.status_code == 429 and err["code"] == "budget_exceeded"
            assert "total tokens budget of 40 tokens" in err["message"]
        spent_by_answers = sum(r.json()["usage"]["total_tokens"] for r in ok)
        usage = httpx.get(base + "/v1/usage", headers=ADMIN_H).json()["total"]
        spend = httpx.get(base + f"/v1/keys/{made['id']}", headers=ADMIN_H).json()["spend"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == spent_by_answers == spend["spent"]
    assert spend["reserved"] == 0  # every reservation settled
    assert spend["spent"] <= budget + 5  # N + the one admission that crossed it, at its estimate
    assert spend["spent"] <= budget + 3 * engine.most  # N + what was in flight (each 3 tokens)
    # It refused only once spend and reservations had reached the budget (requests held 5 each, used 3).
    assert len(ok) * 5 >= budget


def test_budget_in_money_and_the_price_table(tmp_path, database_url):
    with client(tmp_path, database_url) as http:
        # 1 prompt token at $1/M + 2 output tokens at $2/M = $5e-6 a request.
        made = new_key(http, budget=1.2e-5, budget_unit="usd", budget_period="day", team="t")
        complete(http, made["key"])
        complete(http, made["key"])
        with pytest.raises(openai.RateLimitError) as refused:
            complete(http, made["key"])  # 1e-5 spent; the next reserves 3 + 2 tokens: 1.3e-5 > budget
        assert refused.value.code == "budget_exceeded" and "daily usd budget" in refused.value.message
        row = usage_of(http, team="t")["data"][0]
        assert row["cost"] == pytest.approx(1e-5) and row["requests"] == 2


# -- usage -------------------------------------------------------------------------------------------


def test_usage_is_per_key_and_a_key_reads_only_its_own(tmp_path, database_url):
    with client(tmp_path, database_url) as http:
        a = new_key(http, team="red")
        b = new_key(http, team="blue")
        complete(http, a["key"])
        complete(http, b["key"])
        complete(http, b["key"])
        everyone = usage_of(http)["data"]
        assert {(r["key_id"], r["requests"]) for r in everyone} == {(a["id"], 1), (b["id"], 2)}
        assert usage_of(http, team="blue")["total"]["requests"] == 2
        mine = usage_of(http, a["key"])["data"]
        assert [(r["key_id"], r["requests"]) for r in mine] == [(a["id"], 1)]
        assert usage_of(http, a["key"], key_id=b["id"])["data"] == []  # asking for another's: nothing
        assert usage_of(http, model="nope")["data"] == []
        csv = http.get("/v1/usage.csv", headers={"Authorization": f"Bearer {b['key']}"})
        lines = csv.text.strip().splitlines()
        assert csv.headers["content-type"].startswith("text/csv") and len(lines) == 3
        assert lines[0].startswith("created_at,key_id,team,model") and all(b["id"] in x for x in lines[1:])
        assert http.get("/v1/usage?format=csv", headers=ADMIN_H).text.count("\n") == 4
        assert http.get("/v1/usage?start_time=soon", headers=ADMIN_H).status_code == 400


def test_streams_are_metered_and_the_usage_chunk_stays_unasked(tmp_path):
    with client(tmp_path, f"sqlite:///{tmp_path}/ember.db") as http:
        secret = new_key(http)["key"]
        chunks = list(
            sdk(http, secret).completions.create(model=MODEL, prompt=[1, 2], max_tokens=2, stream=True)
        )
        assert chunks and all(c.usage is None for c in chunks)
        asked = list(
            sdk(http, secret).completions.create(
                model=MODEL, prompt=[1, 2], max_tokens=2, stream=True, stream_options={"include_usage": True}
            )
        )
        assert asked[-1].usage.completion_tokens == 2
        assert usage_of(http)["total"] == {
            "prompt_tokens": 2,
            "cached_tokens": 0,
            "completion_tokens": 4,
            "trained_tokens": 0,
            "requests": 2,
            "cost": pytest.approx(2 * 5e-6),
        }


class FakeEmbedder:
    """Two dimensions, one token per word."""

    name, dim, max_input_tokens = "fake-embed", 2, 64

    def tokenize(self, texts):
        return [[1] * len(t.split()) for t in texts]

    def embed(self, ids):
        import torch

        return torch.ones(len(ids), 2)


def test_chat_and_embeddings_are_metered(tmp_path):
    from tests.fixtures_tokenizer import smollm2_tokenizer

    engine = SlowEngine()
    engine.tokenizer = smollm2_tokenizer()
    platform = Platform.open(tmp_path, f"sqlite:///{tmp_path}/ember.db", 1 << 20)
    state = ServerState(admin_key=ADMIN, platform=platform, embedder=FakeEmbedder())
    with TestClient(create_app(engine, MODEL, state)) as http:
        made = new_key(http, team="t")
        c = sdk(http, made["key"])
        chat = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        c.embeddings.create(model="fake-embed", input=["three words here"])
        rows = http.get("/v1/usage.csv", headers=ADMIN_H).text.strip().splitlines()[1:]
    by_endpoint = {r.split(",")[4]: r.split(",") for r in rows}
    assert set(by_endpoint) == {"/v1/chat/completions", "/v1/embeddings"}
    assert int(by_endpoint["/v1/chat/completions"][6]) == chat.usage.prompt_tokens
    assert int(by_endpoint["/v1/embeddings"][6]) == 3  # one token a word
    assert all(r[1] == made["id"] and r[2] == "t" for r in by_endpoint.values())


def test_batch_lines_are_metered_at_the_batch_price(tmp_path):
    import io
    import json

    with client(tmp_path, f"sqlite:///{tmp_path}/ember.db") as http:
        secret = new_key(http)["key"]
        c = sdk(http, secret)
        line = {
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": [1, 2], "max_tokens": 2},
        }
        data = "".join(json.dumps({**line, "custom_id": f"l{i}"}) + "\n" for i in range(3)).encode()
        file = c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = c.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
        deadline = time.monotonic() + 30
        while c.batches.retrieve(batch.id).status != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rows = http.get("/v1/usage.csv", headers=ADMIN_H).text.strip().splitlines()[1:]
        batched = [r.split(",") for r in rows if ",True," in r]
        assert len(batched) == 3
        assert all(float(r[-1]) == pytest.approx(0.5 * 5e-6) for r in batched)  # half of $5e-6


def test_fine_tuning_is_metered_once_its_job_succeeded(tmp_path, database_url):
    from ember.store import db

    with client(tmp_path, database_url) as http:
        made = new_key(http, team="ml", budget=5000)
        job = {
            "id": "ftjob-1",
            "tenant": made["tenant"],
            "model": MODEL,
            "source": MODEL,
            "training_file": "file-1",
            "spec": "{}",
            "seed": 0,
            "status": "succeeded",
            "trained_tokens": 1000,
            "created_at": db.now(),
        }
        http.app.state.ember.platform.store.insert(db.jobs, job)
        for _ in range(2):  # metered once, however often it is read
            rows = [r for r in usage_of(http, made["key"])["data"]]
            assert [(r["key_id"], r["team"], r["trained_tokens"]) for r in rows] == [(made["id"], "ml", 1000)]
            assert rows[0]["cost"] == pytest.approx(1000 * 3.0 / 1e6)
        assert http.get(f"/v1/keys/{made['id']}", headers=ADMIN_H).json()["spend"]["spent"] == 1000
        assert ",/v1/fine_tuning/jobs," in http.get("/v1/usage.csv", headers=ADMIN_H).text


def test_keys_never_in_logs_metrics_or_errors(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with client(tmp_path, f"sqlite:///{tmp_path}/ember.db") as http:
        made = new_key(http, rpm=1, team="sec")
        secret = made["key"]
        complete(http, secret)
        errors = []
        for _ in range(2):
            r = http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": [1]},
                headers={"Authorization": f"Bearer {secret}"},
            )
            errors.append(r.text)
        http.post(f"/v1/keys/{made['id']}/revoke", headers=ADMIN_H)
        errors.append(
            http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": [1]},
                headers={"Authorization": f"Bearer {secret}"},
            ).text
        )
        metrics = http.get("/metrics", headers=ADMIN_H).text
    assert f'key_id="{made["id"]}"' in metrics and "ember:usage_requests_total" in metrics
    secret_part = secret.removeprefix("sk-ember-")
    for text in [metrics, caplog.text, *errors]:
        assert secret_part[4:] not in text


def test_the_key_check_is_a_hash_lookup(tmp_path):
    """Constant time: the presented key is hashed and looked up by its hash; the stored row holds no key
    to compare character by character."""
    import sqlalchemy as sa

    from ember.gateway.keys import hash_key
    from ember.store.keys import virtual_keys

    with client(tmp_path, f"sqlite:///{tmp_path}/ember.db") as http:
        made = new_key(http)
        store = http.app.state.ember.platform.store
        with store.engine.connect() as conn:
            row = conn.execute(sa.select(virtual_keys)).one()._mapping
        assert row["key_hash"] == hash_key(made["key"])
        assert all(made["key"] not in str(v) for v in row.values())
        assert row["tenant"] == http.app.state.ember.tenant(made["key"])  # one owner id, however derived
