"""/v1/usage: what was metered (ember.gateway.usage), summed by key id, team and model; `?format=csv` or
/v1/usage.csv gives the rows themselves as CSV. The admin key sees every key's usage and may filter by
key_id, team, model and time (start_time, end_time: Unix seconds, end exclusive); any other key sees only
its own, whatever it asks for.

Reads first flush the meter, so a request is counted as soon as its answer was sent.
"""

from __future__ import annotations

import asyncio
import csv
import io

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ember.server.files_api import Refusal
from ember.server.platform import PlatformContext
from ember.store.keys import usage

ACCESS = {"/v1/usage": "user_or_admin", "/v1/usage.csv": "user_or_admin"}
TOKENS = ("prompt_tokens", "cached_tokens", "completion_tokens", "trained_tokens")
CSV_COLUMNS = ("created_at", "key_id", "team", "model", "endpoint", "batch", *TOKENS, "cost")


def _where(request: Request, ctx: PlatformContext) -> list:
    q = request.query_params
    unknown = set(q) - {"key_id", "team", "model", "start_time", "end_time", "format"}
    if unknown:
        name = sorted(unknown)[0]
        raise Refusal(400, f"unknown query parameter '{name}'", param=name, code="unknown_parameter")
    where = []
    if not ctx.is_admin(request):  # a key reads its own usage only
        where.append(
            usage.c.tenant == ctx.tenant_of(request) if ctx.tenant_of(request) else usage.c.tenant.is_(None)
        )
    for name in ("key_id", "team", "model"):
        if q.get(name) is not None:
            where.append(usage.c[name] == q[name])
    for name, op in (("start_time", "__ge__"), ("end_time", "__lt__")):
        if q.get(name) is not None:
            try:
                t = int(q[name])
            except ValueError:
                raise Refusal(400, f"'{name}' must be Unix seconds (got {q[name]!r})", param=name) from None
            where.append(getattr(usage.c.created_at, op)(t))
    return where


def install(app: FastAPI, ctx: PlatformContext) -> None:
    store = ctx.platform.store
    meter = ctx.state.gateway.meter

    def summed(where: list) -> list[dict]:
        c = usage.c
        groups = (c.key_id, c.team, c.model)
        query = (
            sa.select(
                *groups,
                sa.func.count().label("requests"),
                *(sa.func.sum(c[t]).label(t) for t in TOKENS),
                sa.func.sum(c.cost).label("cost"),
            )
            .where(*where)
            .group_by(*groups)
            .order_by(*groups)
        )
        with store.engine.connect() as conn:
            return [
                {"object": "usage", **{k: (int(v) if k in TOKENS else v) for k, v in r._mapping.items()}}
                for r in conn.execute(query)
            ]

    def rows_csv(where: list) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        query = sa.select(*(usage.c[n] for n in CSV_COLUMNS)).where(*where).order_by(usage.c.seq)
        with store.engine.connect() as conn:
            writer.writerows(conn.execute(query))
        return out.getvalue()

    async def csv_response(where: list) -> Response:
        text = await asyncio.to_thread(rows_csv, where)
        return Response(
            text,
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
        )

    @app.get("/v1/usage")
    async def get_usage(request: Request):
        where = _where(request, ctx)
        fmt = request.query_params.get("format", "json")
        if fmt not in ("json", "csv"):
            raise Refusal(400, f"'format' must be json or csv (got {fmt!r})", param="format")
        await meter.flush(jobs=True)
        if fmt == "csv":
            return await csv_response(where)
        data = await asyncio.to_thread(summed, where)
        total = {t: sum(d[t] for d in data) for t in (*TOKENS, "requests", "cost")}
        return {"object": "list", "data": data, "total": total}

    @app.get("/v1/usage.csv")
    async def get_usage_csv(request: Request) -> Response:
        where = _where(request, ctx)
        await meter.flush(jobs=True)
        return await csv_response(where)
