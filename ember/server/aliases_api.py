"""/v1/aliases: deployment aliases, a stable model name (`support-bot`) that serves the base model or one
adapter version, repointed without downtime. The admin key creates, repoints and deletes them; every key
lists them, reads their history and sends requests with `model: "support-bot"`.

A version's adapter comes from a directory under a --lora-root (`adapter_path`), an adapter this server
has loaded (`adapter`, e.g. a --lora one) or a fine-tuned model (`adapter: "ft:..."`, from
/v1/fine_tuning/jobs). Each version is loaded under a name of its own (`served_as`), so:

- repointing loads the new version first (engine.add_lora), records it, and only then swaps the alias's
  entry in EngineBackend.aliases, one dict assignment: a request resolves its alias once, at admission,
  and finishes on the adapter it started with;
- the current and the previous version stay loaded (the previous one covers requests admitted just before
  the swap, and makes a rollback instant); older ones are unloaded once `retire_grace_s` has passed and
  the engine agrees that no request uses them (it refuses to remove an adapter in use: then retried).

Aliases survive a restart: they are listed at once, and each answers 503 (Retry-After) until its adapter
is loaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets

import sqlalchemy as sa
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ember.engine.async_engine import LoRAOpError
from ember.engine.messages import ErrorKind
from ember.errors import InvalidRequest
from ember.lora.adapter import AdapterError, precheck
from ember.protocol.requests import check_metadata
from ember.server.app import OUTSIDE_ROOTS, confined
from ember.server.backend import AliasTarget
from ember.server.files_api import Refusal
from ember.server.platform import PlatformContext
from ember.store import aliases as rows
from ember.store import db

ACCESS = {"/v1/aliases": "user_or_admin", "/v1/aliases/{name}": "user_or_admin"}  # writes: admin only
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RETIRE_GRACE_S = 10.0  # a version no longer served stays loaded at least this long
RETIRE_POLL_S = 1.0  # how often an adapter still in use is asked to go again
KEEP_LOADED = 2  # the current version and the one before it

log = logging.getLogger(__name__)


class AliasTargetBody(BaseModel):
    """What a version serves: the base model, plus at most one of `adapter` and `adapter_path`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    adapter: str | None = Field(default=None, min_length=1, max_length=256)
    adapter_path: str | None = Field(default=None, min_length=1, max_length=1024)
    metadata: dict[str, str] | None = None  # kept on the version: why it was made (a job, an eval run)

    @field_validator("metadata")
    @classmethod
    def _limits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(v)


class AliasCreate(AliasTargetBody):
    name: str = Field(min_length=1, max_length=64)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError(
                "an alias name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v


class AliasRepoint(AliasTargetBody):
    expected_version: int | None = Field(default=None, ge=1)  # repoint only if the alias is still there


def version_object(row: dict, loaded: bool, admin: bool) -> dict:
    out = {
        "version": row["version"],
        "created_at": row["created_at"],
        "model": row["model"],
        "source": row["source"],
        "adapter": row["adapter"],
        "served_as": row["served_as"],
        "metadata": row["metadata"],
        "loaded": loaded,
    }
    return {**out, "path": row["path"]} if admin else out  # where it lives: the admin's to know


class Aliases:
    """The aliases of one server: the durable rows, the entries EngineBackend resolves, and the adapter
    loads and unloads behind them. A service: `start` loads what the stored aliases serve."""

    def __init__(self, ctx: PlatformContext, retire_grace_s: float = RETIRE_GRACE_S):
        self.ctx, self.store, self.backend = ctx, ctx.platform.store, ctx.backend
        self.engine = ctx.engine
        self.retire_grace_s = retire_grace_s
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        for alias in rows.load(self.store):  # listed at once; served once `start` has loaded them
            current = alias["history"][0]
            self.backend.aliases[alias["id"]] = self._target(current, "its adapter is loading; retry shortly")

    # -- the service ------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._spawn(self._restore())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restore(self) -> None:
        """Load the kept versions of every stored alias; an alias whose current version fails to load
        says why (503) until it is repointed."""
        wait_ready = getattr(self.engine, "wait_ready", None)
        if wait_ready is not None:
            await wait_ready()
        for alias in await asyncio.to_thread(rows.load, self.store):
            name = alias["id"]
            async with self._locks.setdefault(name, asyncio.Lock()):  # no repoint or delete meanwhile
                current = self.backend.aliases.get(name)
                if current is None or current.version != alias["version"]:
                    continue  # deleted or repointed since it was listed: that made its own entry
                for i, row in enumerate(alias["history"][:KEEP_LOADED]):
                    try:
                        await self._load(name, row)
                    except Exception as exc:
                        log.warning("alias %s version %s cannot be served: %s", name, row["version"], exc)
                        if i == 0:
                            why = f"its adapter failed to load at start: {exc}"
                            self.backend.aliases[name] = self._target(row, why)
                        continue
                    if i == 0:
                        self.backend.aliases[name] = self._target(row)

    # -- what a version serves ----------------------------------------------------------------------

    def _target(self, row: dict, unavailable: str | None = None) -> AliasTarget:
        card = {k: row[k] for k in ("version", "model", "source", "adapter", "served_as")}
        return AliasTarget(row["version"], row["served_as"], card, unavailable)

    async def _load(self, name: str, row: dict) -> None:
        served = row["served_as"]
        if served is None:
            return
        if served not in self.engine.adapters:
            await self.engine.add_lora(served, row["path"])
        self.backend.alias_adapters[served] = name

    def _resolve_target(self, body: AliasTargetBody) -> dict:
        """The version's target (model, source, adapter, path) from a request, or the 4xx that says what
        is wrong with it."""
        base = self.ctx.model_name
        model, adapter, path = body.model or base, body.adapter, body.adapter_path
        if model != base:
            if adapter is not None or path is not None:
                raise InvalidRequest(f"this server serves base model '{base}', not '{model}'", param="model")
            adapter = model  # as a request names a fine-tuned model or an adapter: base + that adapter
        if adapter is not None and path is not None:
            raise InvalidRequest("give 'adapter' or 'adapter_path', not both", param="adapter_path")
        if path is not None:
            real = confined(path, self.ctx.state.lora_roots)
            if real is None:  # one answer whatever is or is not at that path: no file-system oracle
                raise InvalidRequest(OUTSIDE_ROOTS, param="adapter_path", code="invalid_adapter")
            return {"model": base, "source": "adapter_path", "adapter": None, "path": real}
        if adapter is None:
            return {"model": base, "source": "base", "adapter": None, "path": None}
        if adapter in self.backend.aliases:
            raise InvalidRequest(f"'{adapter}' is an alias; an alias points at an adapter", param="adapter")
        if adapter.startswith("ft:"):
            job = self._succeeded_job(adapter)
            if job["model"] != base:
                raise InvalidRequest(
                    f"{adapter} was tuned from '{job['model']}'; this server serves '{base}'", param="adapter"
                )
            return {
                "model": base,
                "source": "fine_tuned_model",
                "adapter": adapter,
                "path": job["adapter_dir"],
            }
        if adapter in self.engine.adapters and adapter not in self.backend.alias_adapters:
            path = self.engine.adapters[adapter]
            return {"model": base, "source": "adapter", "adapter": adapter, "path": path}
        loaded = ", ".join(n for n in sorted(self.engine.adapters) if n not in self.backend.alias_adapters)
        raise Refusal(
            404,
            f"no adapter '{adapter}' is loaded here and no fine-tuning job made it; loaded: {loaded or 'none'}",
            param="adapter",
            code="model_not_found",
        )

    def _succeeded_job(self, name: str) -> dict:
        with self.store.engine.connect() as conn:
            row = conn.execute(
                sa.select(db.jobs).where(db.jobs.c.fine_tuned_model == name, db.jobs.c.status == "succeeded")
            ).first()
        if row is None or row.adapter_dir is None:
            raise Refusal(
                404, f"no succeeded fine-tuning job made '{name}'", param="adapter", code="model_not_found"
            )
        return dict(row._mapping)

    # -- create, repoint, delete ---------------------------------------------------------------------

    async def point(self, name: str, body: AliasTargetBody, create: bool, expected: int | None) -> dict:
        """Make a new version of alias `name` serve `body`'s target: load, record, then swap."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            current = self.backend.aliases.get(name)
            if create and (
                current is not None
                or name in (self.ctx.model_name, getattr(self.ctx.embeddings, "name", None))
                or name in self.engine.adapters
            ):
                raise Refusal(
                    409, f"a model, adapter or alias named '{name}' exists already", "name", "alias_exists"
                )
            if not create and current is None:
                raise Refusal(404, f"no alias named '{name}'", param="name", code="alias_not_found")
            if expected is not None and current.version != expected:
                raise Refusal(
                    409,
                    f"alias '{name}' is at version {current.version}, not {expected}",
                    param="expected_version",
                    code="version_conflict",
                )
            target = await asyncio.to_thread(self._resolve_target, body)
            version = 1 if create else current.version + 1
            served = None
            if target["path"] is not None:
                served = f"{name}.v{version}.{secrets.token_hex(3)}"  # adapter names: [A-Za-z0-9._-]
                if target["source"] == "adapter_path":  # untrusted files: checked off the step loop first
                    try:
                        await asyncio.to_thread(precheck, served, target["path"])
                    except AdapterError as exc:
                        raise InvalidRequest(str(exc), param="adapter_path", code="invalid_adapter") from None
            row = {
                **target,
                "version": version,
                "created_at": db.now(),
                "served_as": served,
                "metadata": body.metadata,
            }
            await self._load(name, row)
            try:
                await asyncio.to_thread(
                    rows.add_version, self.store, name, None if create else version - 1, row
                )
            except rows.VersionConflict as exc:  # another process wrote the alias meanwhile
                self._retire([served], grace=False)
                raise Refusal(409, str(exc), param="name", code="version_conflict") from None
            except BaseException:
                self._retire([served], grace=False)
                raise
            self.backend.aliases[name] = self._target(row)  # the swap: requests admitted now get `row`
            await self._retire_old(name)
        return await self.get(name, admin=True)

    async def delete(self, name: str) -> None:
        async with self._locks.setdefault(name, asyncio.Lock()):
            if self.backend.aliases.pop(name, None) is None:
                raise Refusal(404, f"no alias named '{name}'", param="name", code="alias_not_found")
            await asyncio.to_thread(rows.remove, self.store, name)
            self._retire([a for a, owner in self.backend.alias_adapters.items() if owner == name])

    async def _retire_old(self, name: str) -> None:
        alias = await asyncio.to_thread(rows.get, self.store, name)
        kept = {r["served_as"] for r in alias["history"][:KEEP_LOADED]}
        old = [a for a, owner in self.backend.alias_adapters.items() if owner == name and a not in kept]
        self._retire(old)

    def _retire(self, adapters: list[str | None], grace: bool = True) -> None:
        for adapter in adapters:
            if adapter is not None:
                self._spawn(self._unload(adapter, self.retire_grace_s if grace else 0.0))

    async def _unload(self, adapter: str, grace: float) -> None:
        """Unload an adapter no alias serves any more, once no request uses it."""
        await asyncio.sleep(grace)
        while adapter in self.engine.adapters:
            try:
                await self.engine.remove_lora(adapter)
            except LoRAOpError as exc:
                if exc.kind is not ErrorKind.CONFLICT:  # gone already, or the engine cannot say
                    log.warning("unloading %s: %s", adapter, exc)
                    break
                await asyncio.sleep(RETIRE_POLL_S)  # in use by requests still running
        self.backend.alias_adapters.pop(adapter, None)

    # -- reads --------------------------------------------------------------------------------------

    async def get(self, name: str, admin: bool) -> dict:
        alias = await asyncio.to_thread(rows.get, self.store, name)
        if alias is None:
            raise Refusal(404, f"no alias named '{name}'", param="name", code="alias_not_found")
        return self.alias_object(alias, admin)

    async def list(self, admin: bool) -> list[dict]:
        return [self.alias_object(a, admin) for a in await asyncio.to_thread(rows.load, self.store)]

    def alias_object(self, alias: dict, admin: bool) -> dict:
        name = alias["id"]
        served = self.backend.aliases.get(name)
        history = [
            version_object(r, r["served_as"] is None or r["served_as"] in self.engine.adapters, admin)
            for r in alias["history"]
        ]
        status = "serving" if served is not None and served.unavailable is None else "unavailable"
        return {
            "id": name,
            "object": "alias",
            "created_at": alias["created_at"],
            "updated_at": alias["updated_at"],
            "version": alias["version"],
            "status": status,
            "status_details": served.unavailable if served is not None else None,
            "current": history[0],
            "history": history,
        }


def install(app: FastAPI, ctx: PlatformContext) -> None:
    aliases = Aliases(ctx)
    ctx.services.append(aliases)
    app.state.aliases = aliases  # the flywheel promotes through it (Aliases.point)

    def admin_only(request: Request, verb: str) -> None:
        if ctx.is_admin(request):
            return
        if ctx.state.admin_key is None:
            why = "aliases cannot be changed on this server: start it with --admin-key"
            raise Refusal(403, why, code="admin_disabled")
        raise Refusal(403, f"this API key may not {verb} aliases; use the admin key", code="forbidden")

    @app.post("/v1/aliases")
    async def create(body: AliasCreate, request: Request) -> dict:
        admin_only(request, "create")
        return await aliases.point(body.name, body, create=True, expected=None)

    @app.get("/v1/aliases")
    async def list_aliases(request: Request) -> dict:
        data = await aliases.list(ctx.is_admin(request))
        return {"object": "list", "data": data, "has_more": False}

    @app.get("/v1/aliases/{name}")
    async def retrieve(name: str, request: Request) -> dict:
        return await aliases.get(name, ctx.is_admin(request))

    @app.post("/v1/aliases/{name}")
    @app.put("/v1/aliases/{name}")
    async def repoint(name: str, body: AliasRepoint, request: Request) -> dict:
        admin_only(request, "repoint")
        return await aliases.point(name, body, create=False, expected=body.expected_version)

    @app.delete("/v1/aliases/{name}")
    async def delete(name: str, request: Request) -> dict:
        admin_only(request, "delete")
        await aliases.delete(name)
        return {"id": name, "object": "alias.deleted", "deleted": True}
