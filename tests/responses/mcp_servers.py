"""Real MCP servers for the tests, written with the `mcp` package's server API: a calculator, a key-value
lookup and a server of faults. Each runs over stdio as `python -m tests.responses.mcp_servers NAME` (from
the repository root), and `http_server` serves one over Streamable HTTP from a thread.

Logging is off in the servers: a fault tool's traceback would be the only thing they write.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

# What the lookup knows (keys in lower case).
CAPITALS = {"france": "Paris", "norway": "Oslo", "japan": "Tokyo", "kenya": "Nairobi"}
BIG = 10 << 20  # the fault server's large result: 10 MiB


def calculator(digits: bool = False) -> MCPServer:
    """add and multiply on integers; `digits`: on 0..9 only (an enum in the schema: the call grammar then
    keeps a random model's numbers short)."""
    server = MCPServer("digits" if digits else "calc", log_level="CRITICAL")
    number = Literal[0, 1, 2, 3, 4, 5, 6, 7, 8, 9] if digits else int

    def add(a, b):
        """Add two integers."""
        return a + b

    def multiply(a, b):
        """Multiply two integers."""
        return a * b

    for tool in (add, multiply):  # typed here: the module's annotations are strings, `number` is local
        tool.__annotations__ = {"a": number, "b": number, "return": int}
        server.tool()(tool)
    return server


def lookup() -> MCPServer:
    server = MCPServer("kv", log_level="CRITICAL")

    @server.tool()
    def capital(country: str) -> str:
        """The capital city of a country."""
        found = CAPITALS.get(country.strip().lower())
        if found is None:
            raise ToolError(f"no capital known for '{country}'; known: {', '.join(sorted(CAPITALS))}")
        return found

    return server


def faults() -> MCPServer:
    server = MCPServer("faults", log_level="CRITICAL")

    @server.tool()
    def crash() -> str:
        """Exit the server process in the middle of the call."""
        sys.stdout.flush()
        os._exit(3)

    @server.tool()
    async def sleep(seconds: float) -> str:
        """Sleep, then answer."""
        await asyncio.sleep(seconds)
        return f"slept {seconds} s"

    @server.tool()
    async def hang() -> str:
        """Never answer."""
        await asyncio.sleep(3600)
        return "woke"

    @server.tool()
    def big() -> str:
        """Answer 10 MiB of text."""
        return "x" * BIG

    @server.tool()
    def pid() -> int:
        """The server's process id."""
        return os.getpid()

    @server.tool()
    def spawn() -> int:
        """Start a child process that outlives the call; its id."""
        import subprocess

        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid

    return server


SERVERS = {"calc": calculator, "digits": lambda: calculator(digits=True), "kv": lookup, "faults": faults}


def stdio_command(name: str) -> list[str]:
    """The command that runs server `name` over stdio."""
    return [sys.executable, str(Path(__file__).resolve()), name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(name: str) -> Iterator[str]:
    """Server `name` over Streamable HTTP (under uvicorn, in a thread); yields its URL."""
    import uvicorn

    app = SERVERS[name]().streamable_http_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the MCP HTTP server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}/mcp"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


if __name__ == "__main__":
    SERVERS[sys.argv[1]]().run("stdio")
