"""One response: the model's chat turns on the engine and, between them, the MCP calls the server runs
itself, as the stream of OpenAI's events (the answer without `stream` is the stream's last snapshot).

A turn is a streamed chat request through the EngineBackend, so its tool calls come from the call grammar
(always valid against the tool's schema) and its prompt from the chat template. Each turn renders the
whole conversation again: the previous turn's prompt and output come first, so the prefix cache serves
them. The loop ends at a message, at a function call (the client runs it), or at a limit: max_tool_calls
(later turns may not call tools), max_output_tokens, LoopLimits.max_turns, LoopLimits.max_seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ember.errors import InvalidRequest
from ember.protocol.requests import ChatCompletionRequest
from ember.protocol.responses import ResponseRequest
from ember.responses import items as it
from ember.responses.tools import Tools
from ember.server.backend import ClientGone, RequestContext, Stream


@dataclass
class LoopLimits:
    """Bounds of one response's server-side tool loop."""

    max_turns: int = 10  # model turns in one response; a caller that never stops ends incomplete here
    max_seconds: float = 300.0  # wall time of one response, model turns and tool calls together
    tool_timeout_s: float = 30.0  # one MCP call (the hub's own limit applies too)

    def __post_init__(self):
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be at least 1 (got {self.max_turns})")
        if self.max_seconds <= 0 or self.tool_timeout_s <= 0:
            raise ValueError("max_seconds and tool_timeout_s must be positive")


HUB_GRACE_S = 1.0  # past an MCP call's timeout, how long the hub has to report it before the loop does


class _OutOfTime(Exception):
    pass


class ResponseRun:
    """One response being made. `await start()` opens the first turn (a refused request raises there, before
    anything is streamed); `events()` then runs the loop, yielding OpenAI's events with sequence numbers."""

    def __init__(
        self,
        req: ResponseRequest,
        tools: Tools,
        earlier: list[dict],
        input: list[dict],
        *,
        backend,
        target: str | None,
        context: RequestContext,
        hub,
        limits: LoopLimits,
        finish: Callable[[ResponseRun], Awaitable[None]] | None = None,
    ):
        """`earlier`: the conversation before this input (previous_response_id's); `context`: the caller's
        (its disconnected() is polled together with the deadline); `finish`: called with the finished run
        before the last event (to store it)."""
        self.req, self.tools, self.earlier, self.input = req, tools, earlier, input
        self.backend, self.target, self.hub, self.limits = backend, target, hub, limits
        self.finish = finish
        self.id = it.new_id("resp")
        self.created_at = int(time.time())
        self.deadline = time.monotonic() + limits.max_seconds
        self.output: list[dict] = []
        self.status = "in_progress"
        self.error: dict | None = None
        self.incomplete: dict | None = None
        self.usage = {"input": 0, "cached": 0, "output": 0}
        self.turns = 0
        self.calls = 0  # MCP calls run
        self.seq = 0
        self.format = req.response_format()
        gone = context.disconnected

        async def disconnected() -> bool:
            return time.monotonic() >= self.deadline or await gone()

        self.context = RequestContext(context.cache_salt, disconnected, context.priority, context.tenant)
        self._first: Stream | None = None
        self._finish_reason: str | None = None  # the last turn's
        self.pipeline: dict | None = None  # the steps a pipeline model took (ember.pipelines.serve)

    # -- the loop ------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._first = await self._open_turn()

    async def events(self) -> AsyncIterator[dict]:
        yield self._event("response.created", response=self.snapshot())
        yield self._event("response.in_progress", response=self.snapshot())
        for item in self.tools.listed:
            index = self._add(item)
            yield self._event("response.output_item.added", output_index=index, item={**item, "tools": []})
            yield self._event("response.mcp_list_tools.in_progress", output_index=index, item_id=item["id"])
            yield self._event("response.mcp_list_tools.completed", output_index=index, item_id=item["id"])
            yield self._event("response.output_item.done", output_index=index, item=item)
        stream, self._first = self._first, None
        try:
            while True:
                self.turns += 1
                async for event in self._turn(stream):
                    yield event
                stream = None
                if self._verdict():
                    break
                stream = await self._open_turn()
        except _OutOfTime:
            self._end("incomplete", incomplete={"reason": "max_time"})
        except ClientGone:
            if time.monotonic() < self.deadline:
                raise
            self._end("incomplete", incomplete={"reason": "max_time"})
        except Exception as exc:  # after the stream began: the response fails, the server goes on
            if isinstance(exc, InvalidRequest):
                code, message = "invalid_prompt", str(exc)
            else:
                code, message = "server_error", f"{type(exc).__name__}: {exc}"
            self._end("failed", error={"code": code, "message": message})
        finally:
            if stream is not None:
                stream.close()
        if self.finish is not None:
            await self.finish(self)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(self.status)
        yield self._event(kind or "response.failed", response=self.snapshot())

    async def run(self) -> dict:
        """The finished response object (the loop run without a stream)."""
        async for _ in self.events():
            pass
        return self.snapshot()

    def _verdict(self) -> bool:
        """Whether the response is over after a turn (and how it ended)."""
        turn = [i for i in self.output if i.get("_turn") == self.turns]
        if self._finish_reason == "length":
            self._end("incomplete", incomplete={"reason": "max_output_tokens"})
        elif any(i["type"] == "function_call" for i in turn):
            self._end("completed")  # the client runs its functions and continues
        elif not any(i["type"] == "mcp_call" for i in turn):
            if not turn:  # a turn that said nothing still answers with a message
                self._add(it.message(it.new_id("msg"), "", "completed"))
            self._end("completed")
        elif self.turns >= self.limits.max_turns:
            self._end("incomplete", incomplete={"reason": "max_turns"})
        elif self._tokens_left() == 0:
            self._end("incomplete", incomplete={"reason": "max_output_tokens"})
        else:
            return False
        return True

    def _end(self, status: str, error: dict | None = None, incomplete: dict | None = None) -> None:
        self.status, self.error, self.incomplete = status, error, incomplete
        for item in self.output:  # cut off by a limit or a failure mid-item
            if item.get("status") == "in_progress":
                item["status"] = "incomplete"

    # -- one turn ------------------------------------------------------------------------------------

    async def _open_turn(self) -> Stream:
        req = self.req
        messages = it.to_messages(req.instructions, [*self.earlier, *self.input, *self.output])
        body: dict = {
            "model": req.model,
            "messages": messages,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        budget = None if req.max_tool_calls is None else req.max_tool_calls - self.calls
        if self.tools.chat:
            body["tools"] = self.tools.chat
            body["tool_choice"] = "none" if budget == 0 else self.tools.choice
            body["parallel_tool_calls"] = req.parallel_tool_calls
            if budget and req.parallel_tool_calls:
                body["max_tool_calls"] = budget
        if self.format is not None:
            body["response_format"] = self.format
        if (left := self._tokens_left()) is not None:
            body["max_completion_tokens"] = left
        chat = ChatCompletionRequest.model_validate(body)
        if self.tools.chat and budget == 0 and self.tools.choice != "none":
            # The call budget is spent: no calls, but the prompt the earlier turns had (tools shown), so
            # that the prefix cache serves this turn's whole conversation; tool_choice none would render
            # another prompt from its first message on.
            choice = self.tools.choice
            chat.keep_prompt_tools(choice if isinstance(choice, str) else choice["function"]["name"])
        chat.check_supported(True)
        return await self.backend.chat(chat, self.target, self.context)

    async def _turn(self, stream: Stream) -> AsyncIterator[dict]:
        """The events of one streamed chat turn; MCP calls run as soon as their arguments are complete."""
        text: dict | None = None  # the message item being written
        call: dict | None = None  # the call item being written
        self._finish_reason = None
        try:
            async for chunk in self._chunks(stream):
                if chunk.get("usage"):
                    self._count(chunk["usage"])
                if chunk.get("pipeline"):
                    self.pipeline = chunk["pipeline"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        if text is None:
                            text = self._new(it.message(it.new_id("msg"), "", "in_progress"))
                            index = self.output.index(text)
                            yield self._event(
                                "response.output_item.added", output_index=index, item=it.public(text)
                            )
                            yield self._event("response.content_part.added", **self._at(text), part=_part(""))
                        text["content"][0]["text"] += delta["content"]
                        yield self._event(
                            "response.output_text.delta",
                            **self._at(text),
                            delta=delta["content"],
                            logprobs=[],
                        )
                    for d in delta.get("tool_calls") or []:
                        if d.get("id"):
                            if call is not None:
                                async for event in self._close_call(call):
                                    yield event
                            call = self._new(self._call_item(d))
                            index = self.output.index(call)
                            yield self._event(
                                "response.output_item.added", output_index=index, item=it.public(call)
                            )
                            if call["type"] == "mcp_call":
                                yield self._event(
                                    "response.mcp_call.in_progress", **self._at(call, part=False)
                                )
                        piece = d.get("function", {}).get("arguments")
                        if piece and call is not None:
                            call["arguments"] += piece
                            kind = (
                                "mcp_call_arguments"
                                if call["type"] == "mcp_call"
                                else "function_call_arguments"
                            )
                            yield self._event(
                                f"response.{kind}.delta", **self._at(call, part=False), delta=piece
                            )
                    if choice.get("finish_reason"):
                        self._finish_reason = choice["finish_reason"]
        finally:
            stream.close()
        if text is not None:
            value = text["content"][0]["text"]
            text["status"] = "incomplete" if self._finish_reason == "length" else "completed"
            yield self._event("response.output_text.done", **self._at(text), text=value, logprobs=[])
            yield self._event("response.content_part.done", **self._at(text), part=_part(value))
            yield self._event(
                "response.output_item.done", output_index=self.output.index(text), item=it.public(text)
            )
        if call is not None:
            async for event in self._close_call(call):
                yield event

    def _call_item(self, delta: dict) -> dict:
        name = delta["function"]["name"]
        if name in self.tools.mcp:
            label, tool = self.tools.mcp[name]
            return it.mcp_call(it.new_id("mcp"), label, tool, "", "in_progress")
        return it.function_call(it.new_id("fc"), delta["id"], name, "", "in_progress")

    async def _close_call(self, call: dict) -> AsyncIterator[dict]:
        where = self._at(call, part=False)
        try:
            arguments = json.loads(call["arguments"])
        except json.JSONDecodeError:  # cut short by max_output_tokens: neither run nor handed out
            arguments = None
        if call["type"] == "function_call":
            yield self._event("response.function_call_arguments.done", **where, arguments=call["arguments"])
            call["status"] = "completed" if arguments is not None else "incomplete"
        else:
            yield self._event("response.mcp_call_arguments.done", **where, arguments=call["arguments"])
            if arguments is None:
                call["status"] = "incomplete"
            else:
                output, error = await self._run_mcp(call["server_label"], call["name"], arguments)
                self.calls += 1
                call["output"], call["status"] = output, "completed" if error is None else "failed"
                if error is not None:
                    call["error"] = {
                        "type": "mcp_tool_execution_error",
                        "content": [{"type": "text", "text": error}],
                    }
                yield self._event(
                    "response.mcp_call." + ("completed" if error is None else "failed"), **where
                )
        yield self._event(
            "response.output_item.done", output_index=where["output_index"], item=it.public(call)
        )

    async def _run_mcp(self, label: str, name: str, arguments: dict) -> tuple[str | None, str | None]:
        """(output, error) of one MCP call; a hub that misbehaves is an error the model reads too."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _OutOfTime
        timeout = min(self.limits.tool_timeout_s, left)
        try:  # the hub bounds the call itself; this bounds a hub that does not
            result = await asyncio.wait_for(
                self.hub.call(label, name, arguments, timeout_s=timeout), timeout + HUB_GRACE_S
            )
        except TimeoutError:
            return None, f"the tool '{name}' did not answer within {timeout:.0f} s"
        except Exception as exc:
            return None, f"the tool '{name}' failed: {type(exc).__name__}: {exc}"
        return result.output, result.error

    async def _chunks(self, stream: Stream) -> AsyncIterator[dict]:
        """The turn's chunks, until the response's deadline."""
        chunks = aiter(stream.chunks)
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _OutOfTime
            try:
                chunk = await asyncio.wait_for(anext(chunks), left)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _OutOfTime from None
            yield chunk

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _tokens_left(self) -> int | None:
        cap = self.req.max_output_tokens
        return None if cap is None else max(0, cap - self.usage["output"])

    def _count(self, usage: dict) -> None:
        self.usage["input"] += usage.get("prompt_tokens", 0)
        self.usage["output"] += usage.get("completion_tokens", 0)
        self.usage["cached"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)

    def _add(self, item: dict) -> int:
        self.output.append(item)
        return len(self.output) - 1

    def _new(self, item: dict) -> dict:
        item["_turn"] = self.turns
        self._add(item)
        return item

    def _at(self, item: dict, part: bool = True) -> dict:
        where = {"item_id": item["id"], "output_index": self.output.index(item)}
        return {**where, "content_index": 0} if part else where

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def snapshot(self) -> dict:
        req, u = self.req, self.usage
        done = self.status != "in_progress"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "completed_at": int(time.time()) if self.status == "completed" else None,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls,
            "model": req.model,
            "output": [it.public(i) for i in self.output],
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": req.store,
            "temperature": req.temperature,
            "text": req.text_config(),
            "tool_choice": req.tool_choice or "auto",
            "tools": self.tools.echo,
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": {
                "input_tokens": u["input"],
                "input_tokens_details": {"cached_tokens": u["cached"], "cache_write_tokens": 0},
                "output_tokens": u["output"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u["input"] + u["output"],
            }
            if done
            else None,
            "user": req.user,
            "metadata": req.metadata or {},
            "background": False,
            "service_tier": "default",
        } | ({"pipeline": self.pipeline} if self.pipeline is not None else {})


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
