"""ember/responses/mcp.py against real MCP servers (tests/responses/mcp_servers.py) over stdio and
Streamable HTTP: tools listed and called, and every fault bounded: a crash mid-call is an error at once, a
hang is a timeout and a new session, 10 MiB is cut to --mcp-max-output, stop kills the process group."""

from __future__ import annotations

import asyncio
import os
import time

import jsonschema
import pytest

from ember.config.server import McpServer
from ember.responses.mcp import McpHub
from tests.responses.mcp_servers import BIG, CAPITALS, http_server, stdio_command


def stdio(label: str, name: str | None = None) -> McpServer:
    return McpServer(label, command=tuple(stdio_command(name or label)))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its parent is gone too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run(servers: list[McpServer], body, **kw):
    """`await body(hub)` on a started hub, stopped after."""

    async def go():
        hub = McpHub(servers, **kw)
        await hub.start()
        try:
            return await body(hub)
        finally:
            await hub.stop()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def http_calc():
    with http_server("calc") as url:
        yield url


def test_stdio_servers_list_and_run_their_tools():
    async def body(hub):
        assert hub.labels == ["calc", "kv"]
        calc = {t.name: t for t in await hub.list_tools("calc")}
        assert sorted(calc) == ["add", "multiply"] and calc["add"].description == "Add two integers."
        jsonschema.validate({"a": 1, "b": 2}, calc["add"].input_schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"a": "one"}, calc["add"].input_schema)
        assert (await hub.call("calc", "add", {"a": 40, "b": 2})).output == "42"
        assert (await hub.call("calc", "multiply", {"a": 42, "b": 2})).output == "84"
        # Calls at once share the one session.
        sums = await asyncio.gather(*(hub.call("calc", "add", {"a": i, "b": i}) for i in range(8)))
        assert [r.output for r in sums] == [str(2 * i) for i in range(8)]
        assert (await hub.call("kv", "capital", {"country": "Norway"})).output == CAPITALS["norway"]
        refused = await hub.call("kv", "capital", {"country": "Atlantis"})
        assert refused.output is None and "no capital known for 'Atlantis'" in refused.error
        unknown = await hub.call("calc", "divide", {"a": 1, "b": 0})
        assert unknown.output is None and "divide" in unknown.error
        with pytest.raises(KeyError, match="configured: calc, kv"):
            await hub.call("nope", "add", {})

    run([stdio("calc"), stdio("kv")], body)


def test_a_streamable_http_server_lists_and_runs_its_tools(http_calc):
    async def body(hub):
        assert [t.name for t in await hub.list_tools("web")] == ["add", "multiply"]
        assert (await hub.call("web", "multiply", {"a": 6, "b": 7})).output == "42"

    run([McpServer("web", url=http_calc)], body)


def test_a_server_that_crashes_mid_call_is_an_error_at_once_and_is_restarted():
    async def body(hub):
        first = int((await hub.call("faults", "pid", {})).output)
        start = time.monotonic()
        crashed = await hub.call("faults", "crash", {})
        assert time.monotonic() - start < 1.0  # not the 20 s timeout
        assert crashed.output is None and "closed the connection during the call" in crashed.error
        second = int((await hub.call("faults", "pid", {})).output)
        assert second != first and not alive(first)

    run([stdio("faults")], body, timeout_s=20)


def test_a_hanging_tool_times_out_and_its_session_is_restarted():
    async def body(hub):
        first = int((await hub.call("faults", "pid", {})).output)
        start = time.monotonic()
        hung = await hub.call("faults", "sleep", {"seconds": 60}, timeout_s=0.5)
        assert 0.5 <= time.monotonic() - start < 1.5
        assert hung.output is None and "did not answer within 0.5 s" in hung.error
        assert "restarted" in hung.error
        second = int((await hub.call("faults", "pid", {})).output)
        assert second != first and gone_within(first, 10)
        slow = await hub.call("faults", "sleep", {"seconds": 0.1}, timeout_s=60)  # the hub's own bound: 5 s
        assert slow.output == "slept 0.1 s"

    run([stdio("faults")], body, timeout_s=5)


def test_a_10_mib_result_is_cut_to_max_output_and_says_so():
    async def body(hub):
        r = await hub.call("faults", "big", {})
        assert r.error is None and r.output.startswith("x" * 4096)
        text, _, note = r.output.partition("\n[ember:")
        assert len(text) == 4096 and f"{BIG} bytes" in note and "--mcp-max-output" in note
        assert (await hub.call("faults", "pid", {})).error is None  # the session goes on

    run([stdio("faults")], body, max_output=4096)


def test_stop_kills_a_stdio_server_and_what_it_started():
    pids = {}

    async def body(hub):
        pids["server"] = int((await hub.call("faults", "pid", {})).output)
        pids["child"] = int((await hub.call("faults", "spawn", {})).output)
        assert alive(pids["child"])

    run([stdio("faults")], body)
    assert gone_within(pids["server"], 5) and gone_within(pids["child"], 5)


def test_a_server_that_cannot_start_is_an_error_and_others_serve():
    async def body(hub):
        r = await hub.call("missing", "add", {"a": 1, "b": 1})
        assert r.output is None and "could not be reached" in r.error and "no-such-mcp-server" in r.error
        with pytest.raises(FileNotFoundError):
            await hub.list_tools("missing")
        assert (await hub.call("calc", "add", {"a": 1, "b": 1})).output == "2"

    run([McpServer("missing", command=("no-such-mcp-server",)), stdio("calc")], body)


def test_an_http_server_that_is_down_is_an_error_in_time(http_calc):
    async def body(hub):
        start = time.monotonic()
        r = await hub.call("down", "add", {"a": 1, "b": 1})
        assert r.output is None and "could not be reached" in r.error
        assert time.monotonic() - start < 3

    run([McpServer("down", url="http://127.0.0.1:9/mcp")], body, timeout_s=3)
