"""/v1/responses: create (streamed or not), retrieve, delete and list input items, in OpenAI's shapes, over
ember.responses.run; stored responses in ember.store.responses. A response belongs to the key that made
it: to every other key it does not exist (404), for reading, deleting and continuing alike.

Batches and other features run a response with `ctx.endpoints["/v1/responses"]` (non-streamed).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import Query, Request
from fastapi.responses import StreamingResponse

from ember.errors import InvalidRequest
from ember.protocol.responses import ResponseRequest, input_items
from ember.responses import items as it
from ember.responses.mcp import McpHub
from ember.responses.run import LoopLimits, ResponseRun
from ember.responses.tools import McpUnavailable, resolve_tools
from ember.server.backend import RequestContext
from ember.server.files_api import Refusal, listing
from ember.server.platform import PlatformContext
from ember.store import responses as rows

ACCESS = {
    "/v1/responses": "user",
    "/v1/responses/{response_id}": "user",
    "/v1/responses/{response_id}/input_items": "user",
}


class Responses:
    """The feature: how a response is started for a tenant, and the loop's limits (`limits`)."""

    def __init__(self, ctx: PlatformContext, limits: LoopLimits | None = None):
        self.ctx = ctx
        self.limits = limits or LoopLimits()

    async def start(self, req: ResponseRequest, tenant: str | None, context: RequestContext) -> ResponseRun:
        """A run with its first turn open: everything a request can be refused for is refused here."""
        ctx, state = self.ctx, self.ctx.state
        req.check_supported(state.allow_unknown_fields)
        if state.draining:
            raise Refusal(503, "the server is draining and takes no new requests", code="draining")
        target = ctx.backend.resolve(req.model, tenant)
        if target is False:
            known = ", ".join(ctx.backend.known(tenant))
            raise Refusal(
                404, f"model '{req.model}' does not exist; available: {known}", "model", "model_not_found"
            )
        earlier: list[dict] = []
        if req.previous_response_id is not None:
            row = await asyncio.to_thread(rows.owned, ctx.platform.store, req.previous_response_id, tenant)
            if row is None:
                raise Refusal(
                    404,
                    f"Previous response with id '{req.previous_response_id}' not found.",
                    "previous_response_id",
                    "previous_response_not_found",
                )
            earlier = rows.conversation(row)
        given = it.with_ids(input_items(req.input))
        try:
            tools = await resolve_tools(req, state.mcp, [*earlier, *given])
        except McpUnavailable as exc:
            raise Refusal(424, str(exc), "tools", "mcp_unavailable") from None

        async def store(run: ResponseRun) -> None:
            stored = {**run.snapshot(), "output": run.output}  # output items keep their `_turn`
            await asyncio.to_thread(rows.save, ctx.platform.store, tenant, stored, earlier, given)

        run = ResponseRun(
            req,
            tools,
            earlier,
            given,
            backend=ctx.backend,
            target=target,
            context=context,
            hub=state.mcp,
            limits=self.limits,
            finish=store if req.store else None,
        )
        await run.start()
        return run

    async def endpoint(self, body: dict, tenant: str | None, priority: int) -> dict:
        """PlatformContext.endpoints["/v1/responses"]: a response made inside the server."""
        if body.get("stream"):
            raise InvalidRequest(
                "'stream' is not supported for requests run inside the server", param="stream"
            )
        req = ResponseRequest.model_validate(body)
        salt = self.ctx.state.cache_salt_of(tenant)
        run = await self.start(
            req, tenant, RequestContext(salt, _never_gone, priority=priority, tenant=tenant)
        )
        return await run.run()


def install(app, ctx: PlatformContext) -> None:
    hub = ctx.state.mcp
    if isinstance(hub, McpHub):  # its sessions open and close with the app; its timeout bounds each call
        ctx.services.append(hub)
        feature = Responses(ctx, LoopLimits(tool_timeout_s=hub.timeout_s))
    else:
        feature = Responses(ctx)
    app.state.responses = feature
    ctx.endpoints["/v1/responses"] = feature.endpoint
    state, store = ctx.state, ctx.platform.store

    def owned(response_id: str, request: Request) -> dict:
        row = rows.owned(store, response_id, ctx.tenant_of(request))
        if row is None:
            raise Refusal(
                404, f"Response with id '{response_id}' not found.", "response_id", "response_not_found"
            )
        return row

    @app.post("/v1/responses")
    async def create(body: ResponseRequest, request: Request):
        tenant = ctx.tenant_of(request)
        salt = state.cache_salt(getattr(request.state, "api_key", None))
        run = await feature.start(body, tenant, RequestContext(salt, request.is_disconnected, tenant=tenant))
        if body.stream:
            return StreamingResponse(_sse(run), media_type="text/event-stream")
        return await run.run()

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, request: Request, stream: bool = False) -> dict:
        if stream:
            raise InvalidRequest("streaming a stored response again is not supported", param="stream")
        row = await asyncio.to_thread(owned, response_id, request)
        return _public(row["response"])

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str, request: Request) -> dict:
        row = await asyncio.to_thread(owned, response_id, request)
        await asyncio.to_thread(store.delete, rows.responses, row["id"])
        return {"id": row["id"], "object": "response", "deleted": True}

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(
        response_id: str,
        request: Request,
        after: str | None = None,
        limit: int = Query(20, ge=1, le=100),
        order: Literal["asc", "desc"] = "desc",
    ) -> dict:
        row = await asyncio.to_thread(owned, response_id, request)
        found = [it.public(i) for i in row["input"]]
        if order == "desc":
            found.reverse()
        if after is not None:
            ids = [i["id"] for i in found]
            found = found[ids.index(after) + 1 :] if after in ids else []
        return listing(found[:limit], len(found) > limit)


def _public(response: dict) -> dict:
    return {**response, "output": [it.public(i) for i in response["output"]]}


async def _sse(run: ResponseRun) -> AsyncIterator[str]:
    async for event in run.events():
        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def _never_gone() -> bool:
    return False
