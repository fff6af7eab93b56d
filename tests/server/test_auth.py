"""ember/server/app.py's gate: who may call each route, decided by the route the router matches (never
by the path as written), for every key class and for paths written to slip past a check on the text."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient

from ember.server.app import ServerState, create_app
from tests.server.fake_engine import FakeEngine

MODEL = "base"
USER, ADMIN = "user-key", "admin-key"
KEYS = {"none": None, "wrong": "nope", "user": USER, "admin": ADMIN}
SECRET_PATH = "/srv/adapters/sql"  # only the admin's listing may show it

# method, path, body, who may call it: public (anyone), user (an API key), admin (the admin key)
ROUTES = [
    ("GET", "/health", None, "public"),
    ("GET", "/ready", None, "public"),
    ("GET", "/metrics", None, "admin"),
    ("GET", "/v1/models", None, "user"),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "hi"}, "user"),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        "user",
    ),
    ("POST", "/v1/embeddings", {"model": "nope", "input": "hi"}, "user"),
    ("GET", "/v1/adapters", None, "admin"),
    ("POST", "/v1/adapters", {"name": "x", "path": "/nowhere"}, "admin"),
    ("DELETE", "/v1/adapters/nope", None, "admin"),
    ("GET", "/v1/no-such-route", None, "user"),
]
# Who gets past the gate, by route class and key class.
ALLOWED = {
    "public": {"none", "wrong", "user", "admin"},
    "user": {"user"},
    "admin": {"admin"},
}
REFUSED = {"none": 401, "wrong": 401, "user": 403, "admin": 401}  # on an admin route: 403 for a user key


def _app(**state) -> tuple:
    engine = FakeEngine({"sql": SECRET_PATH})
    state = ServerState(**({"api_keys": [USER], "admin_key": ADMIN} | state))
    return create_app(engine, MODEL, state), engine


def _call(app, method: str, raw_path: str, key: str | None = None, body: dict | None = None):
    """One request straight into the ASGI app, its path as uvicorn hands it over: raw_path as sent,
    path percent-decoded (so '%0A' is a newline), nothing normalised (no client rewrites '..' or '//')."""
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    data = json.dumps(body).encode() if body is not None else b""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent = {"status": None, "body": b""}
    chunks = [{"type": "http.request", "body": data, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")

    asyncio.run(app(scope, receive, send))
    return sent["status"], sent["body"].decode()


@pytest.mark.parametrize("key_class", list(KEYS))
@pytest.mark.parametrize(
    ("method", "path", "body", "access"), ROUTES, ids=[f"{m} {p}" for m, p, *_ in ROUTES]
)
def test_every_route_with_every_key_class(method, path, body, access, key_class):
    app, engine = _app()
    status, text = _call(app, method, path, KEYS[key_class], body)
    if key_class in ALLOWED[access]:
        assert status not in (401, 403), text
    else:
        want = REFUSED[key_class] if access == "admin" else 401
        assert status == want, text
        assert json.loads(text)["error"]["code"] in ("invalid_api_key", "forbidden")
    if key_class != "admin":
        assert SECRET_PATH not in text
    assert engine.loads == [] or key_class == "admin"


# Ways to write the adapters routes that a check on the path's text might miss.
VARIANTS = [
    ("GET", "/v1/adapters%0A"),
    ("GET", "/v1/adapters%0D"),
    ("GET", "/v1/adapters%0D%0A"),
    ("GET", "/v1/adapters%00"),
    ("GET", "/v1/adapters%09"),
    ("GET", "/v1/adapters%7F"),
    ("GET", "//v1/adapters"),
    ("GET", "/v1//adapters"),
    ("GET", "/v1/../v1/adapters"),
    ("GET", "/v1/./adapters"),
    ("GET", "/V1/Adapters"),
    ("GET", "/v1/%61dapters"),
    ("GET", "/v1/adapters/"),
    ("GET", "/v1/adapters%2F"),
    ("POST", "/v1/adapters%0A"),
    ("POST", "/v1/%61dapters"),
    ("DELETE", "/v1/adapters/sql%0A"),
    ("DELETE", "/v1/adapters/sql/"),
    ("DELETE", "/v1/adapters/.."),
    ("DELETE", "/v1/%61dapters/sql"),
    ("GET", "/metrics%0A"),
    ("GET", "/%6detrics"),
]


@pytest.mark.parametrize("key_class", ["none", "wrong", "user"])
@pytest.mark.parametrize(("method", "path"), VARIANTS, ids=[f"{m} {p}" for m, p in VARIANTS])
def test_no_path_variant_reaches_an_admin_route_without_the_admin_key(method, path, key_class):
    app, engine = _app()
    body = {"name": "evil", "path": "/etc"} if method == "POST" else None
    status, text = _call(app, method, path, KEYS[key_class], body)
    assert status in (307, 400, 401, 403, 404, 405), (status, text)
    assert SECRET_PATH not in text and "ember:" not in text  # no listing, no metrics
    assert engine.loads == [] and "sql" in engine.adapters  # nothing loaded, nothing removed
    if any(c in unquote(path) for c in "\n\r\t\0\x7f"):
        assert status == 400 and json.loads(text)["error"]["code"] == "invalid_path"


def test_control_characters_are_refused_on_every_route_whatever_the_key():
    app, _ = _app()
    for path in ("/health%0A", "/v1/models%0D", "/v1/completions%00", "/v1/adapters%0A"):
        for key in KEYS.values():
            status, text = _call(app, "GET", path, key)
            error = json.loads(text)["error"]
            assert (
                status == 400 and error["code"] == "invalid_path" and "control characters" in error["message"]
            )


def test_the_admin_key_reaches_the_adapters_route_however_it_is_spelled():
    app, engine = _app()
    for path in ("/v1/adapters", "/v1/%61dapters"):
        status, text = _call(app, "GET", path, ADMIN)
        assert status == 200 and SECRET_PATH in text
    assert _call(app, "DELETE", "/v1/%61dapters/sql", ADMIN)[0] == 200 and "sql" not in engine.adapters


@pytest.mark.parametrize(
    ("state", "who", "status"),
    [
        ({}, "none", 401),
        ({}, "wrong", 401),
        ({}, "user", 403),
        ({}, "admin", 200),
        ({"admin_key": None}, "user", 403),  # keys but no admin: nobody, unless --metrics-public
        ({"metrics_public": True}, "none", 200),
        ({"metrics_public": True}, "user", 200),
        ({"api_keys": [], "admin_key": None}, "none", 200),  # an open server is open throughout
    ],
)
def test_metrics_are_the_operators(state, who, status):
    app, _ = _app(**state)
    with TestClient(app) as client:
        key = KEYS[who]
        r = client.get("/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    assert r.status_code == status, r.text
    if status == 200:
        assert "ember:http_requests_total" in r.text
    else:
        assert "ember:" not in r.text and r.json()["error"]["type"] in (
            "permission_error",
            "invalid_request_error",
        )
