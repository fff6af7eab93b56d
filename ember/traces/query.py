"""Reading and pruning stored traces: `select` (what the flywheel builds datasets from), the listing
filters the stored-completions routes share with it, and the retention rule the writer enforces."""

from __future__ import annotations

import re
from dataclasses import dataclass

import sqlalchemy as sa

from ember.store.db import Store, now
from ember.store.traces import traces

_AGE = re.compile(r"^(\d+)([smhd])$")
_ROWS = re.compile(r"^(\d+)rows$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def owned(tenant: str | None) -> sa.ColumnElement:
    """Rows of `tenant` only (None: the open server's, which no key's rows are)."""
    return traces.c.tenant.is_(None) if tenant is None else traces.c.tenant == tenant


def filters(
    tenant: str | None,
    *,
    metadata: dict[str, str] | None = None,
    model: str | None = None,
    since: int | None = None,
    until: int | None = None,
    min_score: float | None = None,
) -> list:
    where = [owned(tenant)]
    for key, value in (metadata or {}).items():  # every pair must match
        where.append(traces.c.metadata[key].as_string() == value)
    if model is not None:
        where.append(traces.c.model == model)
    if since is not None:
        where.append(traces.c.created_at >= since)
    if until is not None:
        where.append(traces.c.created_at < until)
    if min_score is not None:
        where.append(traces.c.score >= min_score)
    return where


def select(
    store: Store,
    tenant: str | None,
    *,
    metadata: dict[str, str] | None = None,
    model: str | None = None,
    since: int | None = None,
    until: int | None = None,
    min_score: float | None = None,
    limit: int | None = None,
) -> list[dict]:
    """`tenant`'s stored traces as row dicts (the columns of ember.store.traces), oldest first.

    `metadata`: every pair must be among the row's tags; `model`: as the client named it; `since` <=
    created_at < `until` (unix seconds); `min_score`: rows with feedback of at least this score (rows
    without a score are left out). Only what the writer has committed: call the recorder's `flush()`
    first to include what was captured a moment ago."""
    where = filters(tenant, metadata=metadata, model=model, since=since, until=until, min_score=min_score)
    query = sa.select(traces).where(*where).order_by(traces.c.seq)
    if limit is not None:
        query = query.limit(limit)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


@dataclass(frozen=True)
class Retention:
    """How long traces are kept: rows older than `max_age_s` and rows past the newest `max_rows` (all
    tenants together) are deleted by the writer. None: no such limit."""

    max_age_s: int | None = None
    max_rows: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Retention:
        """'30d', '12h', '1000000rows', '30d,1000000rows' or 'off'."""
        age = rows = None
        for part in (p.strip() for p in spec.split(",")):
            if part == "off":
                continue
            if m := _AGE.match(part):
                age = int(m[1]) * _SECONDS[m[2]]
            elif m := _ROWS.match(part):
                rows = int(m[1])
            else:
                raise ValueError(
                    f"--trace-retention {spec!r}: each part is an age (30d, 12h, 90m, 3600s), a row count "
                    "(1000000rows) or off"
                )
        if age == 0 or rows == 0:
            raise ValueError(f"--trace-retention {spec!r}: a limit of 0 keeps nothing; use --no-store-traces")
        return cls(age, rows)

    def prune(self, store: Store) -> int:
        """Delete what the rule no longer keeps; how many rows went."""
        gone = 0
        with store.tx() as conn:
            if self.max_age_s is not None:
                gone += conn.execute(
                    traces.delete().where(traces.c.created_at < now() - self.max_age_s)
                ).rowcount
            if self.max_rows is not None:
                # The seq of the oldest row kept: the max_rows-th newest.
                edge = conn.execute(
                    sa.select(traces.c.seq).order_by(traces.c.seq.desc()).offset(self.max_rows - 1).limit(1)
                ).scalar()
                if edge is not None:
                    gone += conn.execute(traces.delete().where(traces.c.seq < edge)).rowcount
        return gone
