"""The operator's MCP servers (`--mcp`), as the Responses loop calls them: one client session per server,
over stdio (a child process in its own process group, killed with its children on stop) or Streamable
HTTP, with the `mcp` package's client.

A session is opened at start, and again (in the background, at once) after anything that leaves it in
doubt: the server closed the connection (a crash mid-call reads as an error at once, not after the
timeout), a call ran past its timeout (a hung server is replaced, not waited on), or it could not be
opened. Every call is bounded in time (`timeout_s`, waiting for a session that is still opening included)
and in what it returns (`max_output` bytes of text reach the model; the cut is said in the result). The
client reads a result whole before it is cut: a 10 MiB result costs its size in memory, and seconds of
parsing, while it is read; never the prompt. Failures are results with an `error`, never exceptions: the
model reads them and the loop goes on.

anyio's context managers (the client's, its transport's) must be left in the task that entered them, so
each session lives in a task of its own that holds it open until it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

from ember.config.server import McpServer

log = logging.getLogger("ember.mcp")

# A session unused this long lists its tools again before a call (ping is gone from MCP 2026-07-28): a
# server that died while idle is reopened then, not reported to the model as a failed call.
IDLE_PROBE_S = 10.0
PROBE_TIMEOUT_S = 1.0
OPEN_TIMEOUT_S = 60.0  # starting a server (a Python one imports for seconds) and opening its session
CLOSE_TIMEOUT_S = 10.0  # the mcp client's own shutdown: stdin closed, 2 s, SIGTERM to the group, 2 s, SIGKILL
# A stdio server is started through this: it notes its pid (its process group's id, as the mcp client
# starts it in a session of its own) and becomes the server by exec, so that the group, the server's own
# children included, can be killed once the session is over; the mcp client kills it only on a timeout.
_EXEC_NOTING_PID = (
    "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); os.execvp(sys.argv[2], sys.argv[2:])"
)
MAX_TOOL_PAGES = 100  # tools/list pages read at most (a server whose cursor never ends cannot hang a list)


@dataclass(frozen=True)
class McpTool:
    name: str
    description: str | None
    input_schema: dict


@dataclass(frozen=True)
class McpResult:
    """What the model reads of one call: its output, or why there is none."""

    output: str | None
    error: str | None


class _Session:
    """One open client session, held by its own task until `close()`."""

    def __init__(self, server: McpServer):
        self.server = server
        self.client = None  # mcp.Client, once open
        self.tools: list[McpTool] | None = None  # listed once per session
        self.used = time.monotonic()
        self.dead = False  # closed, or in doubt: the next call opens another
        self._closing = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None

    async def open(self) -> None:
        from mcp import Client
        from mcp.client.stdio import StdioServerParameters

        s = self.server
        pidfile = None
        if s.url is not None:
            target = s.url
        else:
            if shutil.which(s.command[0]) is None:
                raise FileNotFoundError(f"the command '{s.command[0]}' is not found")
            fd, pidfile = tempfile.mkstemp(prefix="ember-mcp-", suffix=".pid")
            os.close(fd)
            # The child inherits the environment: a server started by hand would see the same.
            args = ["-c", _EXEC_NOTING_PID, pidfile, *s.command]
            target = StdioServerParameters(command=sys.executable, args=args, env=dict(os.environ))
        ready = self._ready = asyncio.get_running_loop().create_future()

        async def hold() -> None:
            try:
                async with Client(target, cache=None) as client:
                    ready.set_result(client)
                    await self._closing.wait()
            except BaseException as exc:  # the session's end, however it came: the task ends with it
                if not ready.done():
                    if isinstance(exc, Exception):
                        ready.set_exception(exc)
                    else:
                        ready.cancel()
                elif not isinstance(exc, asyncio.CancelledError):
                    log.warning("MCP server '%s': the session ended: %s", s.label, _describe(exc))
            finally:
                self.dead = True
                if pidfile is not None:
                    _kill_group(pidfile)

        self._task = asyncio.ensure_future(hold())
        try:
            self.client = await asyncio.shield(ready)
        except asyncio.CancelledError:  # the caller's timeout: the half-open session goes too
            self.close()
            raise

    def close(self) -> asyncio.Task | None:
        """Ask the holding task to close the session; the task (to await) ends when it has."""
        self.dead = True
        self._closing.set()
        if self._task is not None and self._ready is not None and not self._ready.done():
            self._task.cancel()  # still opening (a spawn or a connect that hangs): stop it there
        return self._task


class McpHub:
    """The operator's MCP servers, by label: `list_tools`, `call`; a Service (started and stopped with the
    app)."""

    def __init__(
        self,
        servers: list[McpServer],
        timeout_s: float = 30.0,
        max_output: int = 64 << 10,
        open_timeout_s: float = OPEN_TIMEOUT_S,
    ):
        self.servers = {s.label: s for s in servers}
        self.timeout_s = timeout_s
        self.max_output = max_output
        self.open_timeout_s = open_timeout_s
        self._sessions: dict[str, _Session] = {}
        # A session being opened: one task per server, awaited by every call that needs it and never
        # cancelled by a caller's timeout (a server slow to start is still starting for the next call).
        self._opening: dict[str, asyncio.Task] = {}
        self._closing: set[asyncio.Task] = set()  # sessions being closed, awaited by stop()

    @property
    def labels(self) -> list[str]:
        return list(self.servers)

    async def start(self) -> None:
        """Open every server's session, so that one that cannot start says so in the log at once; a server
        that fails here is tried again on first use."""
        results = await asyncio.gather(
            *(self._opened(label) for label in self.servers), return_exceptions=True
        )
        for label, result in zip(self.servers, results, strict=True):
            if isinstance(result, BaseException):
                log.warning(
                    "MCP server '%s' did not start: %s (tried again on first use)", label, _describe(result)
                )
            else:
                log.info("MCP server '%s' ready", label)

    async def stop(self) -> None:
        """Close every session; stdio servers are stopped (their whole process group)."""
        for task in self._opening.values():
            task.cancel()
        if self._opening:
            await asyncio.wait(set(self._opening.values()), timeout=CLOSE_TIMEOUT_S)
        for label in list(self._sessions):
            self._retire(label, reopen=False)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=CLOSE_TIMEOUT_S)

    async def list_tools(self, label: str) -> list[McpTool]:
        """The server's tools (listed once per session); raises what kept them from being listed."""
        self._known(label)
        session = None
        try:
            async with asyncio.timeout(self.timeout_s):
                session = await self._session(label)
                if session.tools is None:
                    session.tools = await _list(session.client)
                session.used = time.monotonic()
                return session.tools
        except Exception as exc:
            if session is not None:  # it answered nothing sensible: the next request gets a new one
                self._retire(label)
            if isinstance(exc, TimeoutError):
                raise TimeoutError(f"no answer within {self.timeout_s:g} s") from None
            raise

    async def call(self, label: str, name: str, arguments: dict, timeout_s: float | None = None) -> McpResult:
        """Run one tool; every failure is an McpResult with an error, in time: `timeout_s` (at most the
        hub's), waiting for the session included."""
        self._known(label)
        limit = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        session = None
        try:
            async with asyncio.timeout(limit):
                session = await self._session(label)
                result = await session.client.call_tool(name, arguments)
                session.used = time.monotonic()
        except TimeoutError:
            if session is None:
                return McpResult(
                    None, f"MCP server '{label}' is still starting (not ready within {limit:g} s)"
                )
            self._retire(label)
            return McpResult(
                None,
                f"the tool '{name}' of MCP server '{label}' did not answer within {limit:g} s; "
                "the server's session is restarted",
            )
        except Exception as exc:
            from mcp.shared.exceptions import MCPError
            from mcp_types import CONNECTION_CLOSED

            if isinstance(exc, MCPError) and exc.code != CONNECTION_CLOSED:  # the server answered: an error
                return McpResult(None, f"MCP server '{label}' refused the call to '{name}': {exc}")
            if session is not None:
                self._retire(label)
                why = "closed the connection during the call (it crashed or exited)"
            else:
                why = f"could not be reached ({_describe(exc)})"
            return McpResult(None, f"MCP server '{label}' {why}; it is restarted for the next call")
        text = _text(result, self.max_output)
        return McpResult(None, text or "the tool failed") if result.is_error else McpResult(text, None)

    # -- sessions ------------------------------------------------------------------------------------

    def _known(self, label: str) -> None:
        if label not in self.servers:
            raise KeyError(
                f"no MCP server labelled '{label}'; configured: {', '.join(self.servers) or 'none'}"
            )

    async def _session(self, label: str) -> _Session:
        """The label's open session, opened (or reopened) if need be."""
        session = self._sessions.get(label)
        if session is not None and not session.dead and time.monotonic() - session.used > IDLE_PROBE_S:
            try:  # a server that died while idle is found here, not by the call the model made
                session.tools = await asyncio.wait_for(_list(session.client), PROBE_TIMEOUT_S)
                session.used = time.monotonic()
            except Exception:
                self._retire(label)
        session = self._sessions.get(label)
        if session is not None and not session.dead:
            return session
        return await self._opened(label)

    def _opened(self, label: str) -> asyncio.Future:
        """The session being opened for `label` (opening one if none is); callers may stop waiting."""
        return asyncio.shield(self._opening_task(label))

    def _opening_task(self, label: str) -> asyncio.Task:
        task = self._opening.get(label)
        if task is None or task.done():
            task = self._opening[label] = asyncio.ensure_future(self._open(label))
            task.add_done_callback(
                lambda t: self._opening.pop(label, None) if self._opening.get(label) is t else None
            )
            task.add_done_callback(_retrieved)
        return task

    async def _open(self, label: str) -> _Session:
        self._retire(label, reopen=False)
        session = _Session(self.servers[label])
        try:
            async with asyncio.timeout(self.open_timeout_s):
                await session.open()
        except BaseException:
            session.close()
            raise
        self._sessions[label] = session
        return session

    def _retire(self, label: str, reopen: bool = True) -> None:
        """Close the label's session (in the background: a stdio server gets seconds to exit) and open the
        next one at once (`reopen`), so that the next call finds it ready."""
        session = self._sessions.pop(label, None)
        if session is not None:
            task = session.close()
            if task is not None and not task.done():
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        if reopen:
            self._opening_task(label)


def _retrieved(task: asyncio.Task) -> None:
    """A background open's failure is the next caller's to see, not asyncio's to log as never retrieved."""
    if not task.cancelled():
        task.exception()


def _kill_group(pidfile: str) -> None:
    """Kill what is left of a stdio server's process group (its pid noted in `pidfile`, then removed)."""
    try:
        with open(pidfile) as f:
            text = f.read().strip()
        os.unlink(pidfile)
    except OSError:
        return
    if text.isdigit():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(text), signal.SIGKILL)


async def _list(client) -> list[McpTool]:
    tools: list[McpTool] = []
    cursor = None
    for _ in range(MAX_TOOL_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools += [McpTool(t.name, t.description, dict(t.input_schema or {})) for t in page.tools]
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _text(result, limit: int) -> str:
    """A CallToolResult as the text the model reads, at most `limit` bytes of UTF-8 (the cut said)."""
    parts: list[str] = []
    for block in result.content or []:
        kind = getattr(block, "type", "?")
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource" and isinstance(getattr(block.resource, "text", None), str):
            parts.append(block.resource.text)
        else:
            mime = getattr(block, "mime_type", None) or getattr(
                getattr(block, "resource", None), "mime_type", None
            )
            parts.append(f"[{kind} content{f' ({mime})' if mime else ''}, not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    text = "\n".join(parts)
    data = text.encode()
    if len(data) <= limit:
        return text
    note = f"\n[ember: the tool's output was {len(data)} bytes; cut to the first {limit} (--mcp-max-output)]"
    return data[:limit].decode(errors="ignore") + note


def _describe(exc: BaseException) -> str:
    """One line for an exception, an anyio exception group's first leaf included."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
