"""The platform's store behind the server: routes served with it and refused without it, and `call`, the
internal way to run an API request (batches, evals) that answers as the HTTP route would."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from ember.server.app import ServerState, create_app
from ember.server.platform import BATCH_PRIORITY, Platform
from tests.server.fake_engine import FakeEngine

MODEL = "fake-model"
KEYS = ["key-a", "key-b"]


@pytest.fixture
def app(tmp_path):
    platform = Platform.open(tmp_path, f"sqlite:///{tmp_path}/ember.db", 1 << 20)
    state = ServerState(api_keys=list(KEYS), admin_key="admin", platform=platform)
    return create_app(FakeEngine({"tuned": "/adapters/tuned"}), MODEL, state)


def get(app, path: str, key: str = "key-a") -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(path, headers={"Authorization": f"Bearer {key}"})

    return asyncio.run(go())


def test_files_are_served_with_the_store_and_fine_tuning_says_how_to_turn_it_on(app):
    assert get(app, "/v1/files").json()["object"] == "list"
    r = get(app, "/v1/fine_tuning/jobs")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "not_enabled" and "--fine-tuning" in err["message"]


def test_an_internal_call_answers_as_the_route_would(app):
    call = app.state.platform.call
    tenant = app.state.ember.tenant("key-a")

    ok = asyncio.run(call("/v1/completions", {"model": MODEL, "prompt": [1, 2, 3]}, tenant, BATCH_PRIORITY))
    assert ok.ok and ok.body["object"] == "text_completion"
    assert ok.body["choices"][0]["text"] == "lora=None"
    tuned = asyncio.run(call("/v1/completions", {"model": "tuned", "prompt": [1]}, tenant, 0))
    assert tuned.body["choices"][0]["text"] == "lora=tuned"

    missing = asyncio.run(call("/v1/completions", {"prompt": [1]}, tenant, 0))
    assert missing.status == 400 and missing.body["error"]["param"] == "model"
    unknown = asyncio.run(call("/v1/completions", {"model": MODEL, "prompt": [1], "bogus": 1}, tenant, 0))
    assert unknown.status == 400 and unknown.body["error"]["code"] == "unknown_parameter"
    nobody = asyncio.run(call("/v1/completions", {"model": "nope", "prompt": [1]}, tenant, 0))
    assert nobody.status == 404 and nobody.body["error"]["code"] == "model_not_found"
    streamed = asyncio.run(
        call("/v1/completions", {"model": MODEL, "prompt": [1], "stream": True}, tenant, 0)
    )
    assert streamed.status == 400 and streamed.body["error"]["param"] == "stream"
    route = asyncio.run(call("/v1/files", {}, tenant, 0))
    assert route.status == 400 and route.body["error"]["code"] == "invalid_url"


def test_a_tenants_cache_namespace_is_its_keys_and_nobody_elses():
    state = ServerState(api_keys=list(KEYS))
    a, b = state.tenant("key-a"), state.tenant("key-b")
    assert state.cache_salt_of(a) == state.cache_salt("key-a") != state.cache_salt_of(b)
    assert state.cache_salt_of("key-unknown") != state.cache_salt_of("key-unknown")  # shares nothing
    assert ServerState().cache_salt_of(None) is None  # an open server: one namespace
