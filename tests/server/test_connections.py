"""Slowloris and connection floods against a real uvicorn server with ember's protocol: headers that never
finish are cut off at --header-timeout, connections past --max-connections are closed at once, and both
say so in the log."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest
from fastapi import FastAPI

from ember.config import ServerConfig
from tests.server.fakes import serving

MAX = 8


@pytest.fixture(scope="module")
def server():
    app = FastAPI()

    @app.get("/")
    async def root() -> dict:
        return {"ok": True}

    options = ServerConfig(port=0, header_timeout=1.0, max_connections=MAX)
    with serving(app, options) as addr:
        yield addr


def _closed(s: socket.socket, wait: float) -> bool:
    """True once the server has closed `s` (within `wait` seconds)."""
    s.settimeout(wait)
    try:
        return s.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_headers_that_never_finish_are_cut_off(server, caplog):
    caplog.set_level(logging.WARNING, logger="ember.server.connections")
    socks = [socket.create_connection(server) for _ in range(6)]
    try:
        t0 = time.monotonic()
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nHo")
        open_after = {}
        # one more header byte each every 0.3 s: never idle, never done
        while time.monotonic() - t0 < 3:
            for i, s in enumerate(socks):
                if i in open_after:
                    continue
                try:
                    s.sendall(b"s")
                except OSError:
                    open_after[i] = time.monotonic() - t0
                    continue
                if _closed(s, 0.05):
                    open_after[i] = time.monotonic() - t0
            if len(open_after) == len(socks):
                break
            time.sleep(0.3)
        assert len(open_after) == len(socks), f"still open after 3 s: {len(socks) - len(open_after)}"
        assert all(0.8 < t < 2.5 for t in open_after.values()), open_after
    finally:
        for s in socks:
            s.close()
    assert "--header-timeout" in caplog.text
    # a normal request is unaffected
    assert httpx.get(f"http://{server[0]}:{server[1]}/").json() == {"ok": True}


def test_connections_past_the_cap_are_closed_at_once(server, caplog):
    caplog.set_level(logging.WARNING, logger="ember.server.connections")
    time.sleep(0.2)  # the previous test's connections are gone
    socks = [socket.create_connection(server) for _ in range(MAX + 4)]
    try:
        time.sleep(0.2)
        closed = [_closed(s, 0.01) for s in socks]  # all checked well inside the header timeout
        assert sum(closed) == 4, closed
        assert not any(closed[:MAX])  # the first ones still wait for their headers
    finally:
        for s in socks:
            s.close()
    assert "--max-connections" in caplog.text
    time.sleep(0.2)
    assert httpx.get(f"http://{server[0]}:{server[1]}/").status_code == 200


def test_a_kept_alive_connection_gets_a_fresh_header_deadline_per_request(server):
    with socket.create_connection(server) as s:
        for _ in range(2):
            time.sleep(0.6)  # together past the header timeout, each request well inside it
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(2)
            data = b""
            while b'{"ok":true}' not in data:
                chunk = s.recv(4096)
                assert chunk, f"closed after {data!r}"
                data += chunk
            assert data.startswith(b"HTTP/1.1 200")
