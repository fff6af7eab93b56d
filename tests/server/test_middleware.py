"""The middlewares around the API: body limits (413, 408) before any parsing, x-request-id on every
response, CORS only where origins are allowed, and the model_name label on /metrics."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from starlette.testclient import TestClient

from ember.config import ServerConfig
from ember.server.app import create_app
from tests.server.fakes import FakeEngine, serving

LIMIT = 4096


@pytest.fixture(scope="module")
def server():
    options = ServerConfig(port=0, max_request_bytes=LIMIT, body_timeout=1.0, header_timeout=5.0)
    with serving(create_app(FakeEngine(), "m", options=options), options) as addr:
        yield addr


def _exchange(addr, head: bytes, body_parts=(), pause: float = 0.0, timeout: float = 5.0) -> tuple[int, dict]:
    """Send raw request bytes (the head, then the parts), read the response: (status, JSON body)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(head)
        try:
            for part in body_parts:
                s.sendall(part)
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending: what a limit does
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head_text, _, body = data.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), json.loads(body)


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _post_head(path: str, extra: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}\r\n".encode()


def test_declared_oversized_body_is_refused_before_it_is_sent(server):
    t0 = time.monotonic()
    status, body = _exchange(server, _post_head("/v1/chat/completions", "Content-Length: 50000000\r\n"))
    assert status == 413
    assert body["error"]["code"] == "request_too_large"
    assert body["error"]["type"] == "invalid_request_error"
    assert "--max-request-bytes" in body["error"]["message"]
    assert time.monotonic() - t0 < 2  # answered from the header, not after reading 50 MB


def test_chunked_body_past_the_limit_is_refused_while_it_streams(server):
    chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
    status, body = _exchange(
        server, _post_head("/v1/completions", "Transfer-Encoding: chunked\r\n"), [chunk] * 64, pause=0.005
    )
    assert status == 413
    assert "at most 4096 bytes" in body["error"]["message"]


def test_a_body_too_slow_to_arrive_gets_408(server):
    t0 = time.monotonic()
    status, body = _exchange(server, _post_head("/v1/completions", "Content-Length: 100\r\n") + b'{"mo')
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert time.monotonic() - t0 < 4


def test_a_body_within_the_limit_reaches_its_route(server):
    url = f"http://{server[0]}:{server[1]}"
    r = httpx.post(url + "/v1/embeddings", json={"model": "e", "input": "x" * (LIMIT - 100)})
    assert r.status_code == 404  # the route's own answer: this server has no embedding model
    assert r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url + "/v1/embeddings", json={"model": "e", "input": "x" * LIMIT})
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("sent", "echoed"), [("client-id-42", True), ("x" * 200, False), ("a b", False), (None, False)]
)
def test_every_response_carries_a_request_id(server, sent, echoed):
    url = f"http://{server[0]}:{server[1]}"
    headers = {"x-request-id": sent} if sent else {}
    for r in (
        httpx.get(url + "/health", headers=headers),
        httpx.get(url + "/no-such-route", headers=headers),
        httpx.post(url + "/v1/completions", headers=headers, content=b"x" * (LIMIT + 1)),
    ):
        rid = r.headers["x-request-id"]
        assert (rid == sent) is echoed
        assert 1 <= len(rid) <= 128


def test_cors_only_for_allowed_origins():
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    off = TestClient(create_app(FakeEngine(), "m"))
    assert "access-control-allow-origin" not in off.options("/v1/chat/completions", headers=preflight).headers
    on = TestClient(
        create_app(FakeEngine(), "m", options=ServerConfig(allowed_origins=["http://app.example"]))
    )
    r = on.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    assert "x-request-id" in r.headers
    other = on.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    r = on.get("/health", headers={"Origin": "http://app.example"})
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"]


def test_allowed_origins_read_commas():
    assert ServerConfig(allowed_origins=["http://a, http://b", "http://c"]).allowed_origins == [
        "http://a",
        "http://b",
        "http://c",
    ]


def test_metrics_carry_the_served_model_name():
    engine = FakeEngine()
    client = TestClient(create_app(engine, "my-model"))
    client.get("/health")
    engine.metrics.request_success.labels(finished_reason="stop").inc()
    lines = [ln for ln in client.get("/metrics").text.splitlines() if ln and not ln.startswith("#")]
    assert lines
    assert all('model_name="my-model"' in ln for ln in lines), [ln for ln in lines if "my-model" not in ln]
    assert any('finished_reason="stop"' in ln for ln in lines)
