"""The Batch API's rows: one per batch, and one per valid input line, keyed (batch_id, custom_id).

A line's row is written pending when the batch is validated and marked done, with its answer, in the same
transaction that counts it on the batch row (`record`); so a restart (even after SIGKILL) knows exactly which lines
are left, and a line is counted and written to the output file once, however often it was run.
"""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa

from ember.store import db

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")  # the runner has work on these

batches = sa.Table(
    "batches",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), unique=True, nullable=False),
    sa.Column("tenant", sa.String(40), nullable=True, index=True),
    sa.Column("endpoint", sa.String(64), nullable=False),
    sa.Column("input_file_id", sa.String(40), nullable=False),
    sa.Column("completion_window", sa.String(8), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("metadata", sa.JSON, nullable=True),
    sa.Column("model", sa.String(256), nullable=True),  # the first valid line's model
    sa.Column("errors", sa.JSON, nullable=True),  # why the batch failed: [{code, message, param, line}]
    sa.Column(
        "rejects", sa.JSON, nullable=True
    ),  # lines refused at validation: [{line, custom_id, code, ...}]
    sa.Column("output_file_id", sa.String(48), nullable=True),
    sa.Column("error_file_id", sa.String(48), nullable=True),
    sa.Column("output_expires_s", sa.Integer, nullable=True),  # output_expires_after.seconds
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("completed", sa.Integer, nullable=False, default=0),
    sa.Column("failed", sa.Integer, nullable=False, default=0),
    sa.Column("input_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("cached_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("output_tokens", sa.BigInteger, nullable=False, default=0),
    *(
        sa.Column(name, sa.Integer, nullable=True)
        for name in (
            "created_at",
            "in_progress_at",
            "expires_at",
            "finalizing_at",
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
        )
    ),
)

lines = sa.Table(
    "batch_lines",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("batch_id", sa.String(40), nullable=False),
    sa.Column("custom_id", sa.String(512), nullable=False),
    sa.Column("line", sa.Integer, nullable=False),  # 1-based, in the input file
    sa.Column("body", sa.JSON, nullable=False),
    sa.Column("done", sa.Boolean, nullable=False, default=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("response", sa.JSON, nullable=True),  # the answer's body (an error body for a 4xx/5xx)
    sa.Column("id", sa.String(48), nullable=True),  # batch_req-<hex>, set when done
    sa.Column("request_id", sa.String(48), nullable=True),
    sa.Column("finished_at", sa.Integer, nullable=True),
    sa.UniqueConstraint("batch_id", "custom_id", name="uq_batch_lines_custom_id"),
    sa.Index("ix_batch_lines_pending", "batch_id", "done", "line"),
)


def insert(store: db.Store, row: dict) -> dict:
    with store.tx() as conn:
        conn.execute(batches.insert().values(**row))
    return get(store, row["id"])


def get(store: db.Store, batch_id: str) -> dict | None:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(batches).where(batches.c.id == batch_id)).first()
    return None if row is None else dict(row._mapping)


def set_status(store: db.Store, batch_id: str, values: dict, only_if: tuple[str, ...]) -> bool:
    """Move a batch on, only from one of the statuses `only_if` (a cancel is never overwritten)."""
    query = batches.update().where(batches.c.id == batch_id, batches.c.status.in_(only_if))
    with store.tx() as conn:
        return conn.execute(query.values(**values)).rowcount == 1


def start(store: db.Store, batch_id: str, valid: list[dict], values: dict) -> bool:
    """Validating -> in_progress: the valid lines written pending and the verdict, in one transaction.
    False (nothing written) when the batch left `validating` meanwhile (a cancel)."""
    with store.tx() as conn:
        moved = conn.execute(
            batches.update()
            .where(batches.c.id == batch_id, batches.c.status == "validating")
            .values(status="in_progress", **values)
        ).rowcount
        if moved != 1:
            conn.rollback()
            return False
        if valid:
            conn.execute(lines.insert(), [{"batch_id": batch_id, "done": False, **v} for v in valid])
    return True


def pending(store: db.Store, batch_id: str) -> list[dict]:
    """The lines not answered yet, in file order."""
    query = (
        sa.select(lines.c.custom_id, lines.c.line, lines.c.body)
        .where(lines.c.batch_id == batch_id, lines.c.done.is_(False))
        .order_by(lines.c.line)
    )
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def record(store: db.Store, answers: list[tuple[str, str, dict, dict]]) -> list[bool]:
    """Lines' answers and their counts on their batches, in one transaction (the lines that finish in one
    engine step commit together): (batch_id, custom_id, answer, usage) each. Per line, whether it was
    recorded now (False: it had been before)."""
    recorded = []
    c = batches.c
    with store.tx() as conn:
        for batch_id, custom_id, answer, usage in answers:
            done = conn.execute(
                lines.update()
                .where(lines.c.batch_id == batch_id, lines.c.custom_id == custom_id, lines.c.done.is_(False))
                .values(done=True, **answer)
            ).rowcount
            recorded.append(done == 1)
            if done != 1:
                continue
            ok = answer["status_code"] == 200
            conn.execute(
                batches.update()
                .where(c.id == batch_id)
                .values(
                    completed=c.completed + int(ok),
                    failed=c.failed + int(not ok),
                    input_tokens=c.input_tokens + usage.get("input_tokens", 0),
                    cached_tokens=c.cached_tokens + usage.get("cached_tokens", 0),
                    output_tokens=c.output_tokens + usage.get("output_tokens", 0),
                )
            )
    return recorded


def results(store: db.Store, batch_id: str) -> Iterator[dict]:
    """Every valid line of the batch, done or not, in file order (read in pages: a batch can be big)."""
    after = 0
    while True:
        query = (
            sa.select(lines).where(lines.c.batch_id == batch_id, lines.c.line > after).order_by(lines.c.line)
        )
        with store.engine.connect() as conn:
            page = [dict(r._mapping) for r in conn.execute(query.limit(1000))]
        yield from page
        if len(page) < 1000:
            return
        after = page[-1]["line"]


def active(store: db.Store) -> list[dict]:
    """The batches the runner has work on, oldest first."""
    query = sa.select(batches.c.id, batches.c.status).where(batches.c.status.in_(ACTIVE))
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query.order_by(batches.c.seq))]
