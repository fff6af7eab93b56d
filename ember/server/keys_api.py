"""/v1/keys: the admin's virtual keys (ember.gateway.keys). Create answers the key itself, once; nothing
after that shows it. Revoke keeps the row (its usage still names it) and stops the key on every replica
of the database within ember.gateway.keys.CACHE_S.

    POST /v1/keys                    create: {name, owner, team, models, rpm, tpm, budget, budget_unit,
                                     budget_period}
    GET  /v1/keys                    list (?team=)
    GET  /v1/keys/{key_id}           one key, with its current budget period's spend
    POST /v1/keys/{key_id}           update any of create's fields
    POST /v1/keys/{key_id}/revoke    revoke
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request

from ember.gateway import budgets
from ember.gateway.keys import KeyRing, VirtualKey
from ember.server.files_api import Refusal
from ember.server.platform import PlatformContext, decode

ACCESS = {
    "/v1/keys": "admin",
    "/v1/keys/{key_id}": "admin",
    "/v1/keys/{key_id}/revoke": "admin",
}


async def _settings(request: Request) -> dict:
    try:
        body = decode(await request.body())
    except ValueError:
        raise Refusal(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise Refusal(400, "the request body must be a JSON object of key settings")
    return body


def install(app: FastAPI, ctx: PlatformContext) -> None:
    gateway = ctx.state.gateway
    keys: KeyRing = gateway.keys
    store = ctx.platform.store
    ctx.services.append(gateway.meter)  # the usage writer (ember.gateway.usage)

    def card(key: VirtualKey) -> dict:
        out = key.card()
        if key.budget is not None:
            out["spend"] = budgets.spend_of(store, key)
        return out

    def found(key: VirtualKey | None, key_id: str) -> VirtualKey:
        if key is None:
            raise Refusal(404, f"no virtual key with id '{key_id}'", param="key_id", code="not_found")
        return key

    @app.post("/v1/keys")
    async def create_key(request: Request) -> dict:
        settings = await _settings(request)
        secret, key = await asyncio.to_thread(keys.create, settings)
        return {**key.card(), "key": secret}

    @app.get("/v1/keys")
    async def list_keys(team: str | None = None) -> dict:
        rows = await asyncio.to_thread(keys.list, team)
        return {"object": "list", "data": [r.card() for r in rows]}

    @app.get("/v1/keys/{key_id}")
    async def get_key(key_id: str) -> dict:
        key = found(await asyncio.to_thread(keys.get, key_id), key_id)
        return await asyncio.to_thread(card, key)

    @app.post("/v1/keys/{key_id}")
    async def update_key(key_id: str, request: Request) -> dict:
        settings = await _settings(request)
        return found(await asyncio.to_thread(keys.update, key_id, settings), key_id).card()

    @app.post("/v1/keys/{key_id}/revoke")
    async def revoke_key(key_id: str) -> dict:
        return found(await asyncio.to_thread(keys.revoke, key_id), key_id).card()
