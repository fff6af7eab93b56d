"""The Evals API's rows: evals, their runs, and one row per run item (an output item once graded).

A run's items are written pending with the run, in one transaction, when it is created; an item is marked
done with its sample and results in the same transaction that counts it on the run (`record`), so a
restart knows exactly which items are left, and none is counted twice however often it was graded.

Column names avoid `metadata`, `error` and `data`: Store decodes those as JSON text (Store.JSON_COLUMNS),
and these tables keep JSON in sa.JSON columns instead.
"""

from __future__ import annotations

import sqlalchemy as sa

from ember.store import db

ACTIVE = ("queued", "in_progress")  # the runner has work on these
FINAL = ("completed", "failed", "canceled")

evals = sa.Table(
    "evals",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), unique=True, nullable=False),
    sa.Column("tenant", sa.String(40), nullable=True, index=True),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("data_source_config", sa.JSON, nullable=False),  # as answered: {type: custom, schema}
    sa.Column("testing_criteria", sa.JSON, nullable=False),
    sa.Column("tags", sa.JSON, nullable=True),  # the eval's metadata
    sa.Column("created_at", sa.Integer, nullable=False),
)

runs = sa.Table(
    "eval_runs",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), unique=True, nullable=False),
    sa.Column("eval_id", sa.String(40), nullable=False, index=True),
    sa.Column("tenant", sa.String(40), nullable=True, index=True),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("model", sa.String(256), nullable=True),  # the completions source's model
    sa.Column("data_source", sa.JSON, nullable=False),  # as given, file_content included
    sa.Column("testing_criteria", sa.JSON, nullable=False),  # the eval's, when the run was made
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("tags", sa.JSON, nullable=True),
    sa.Column("failure", sa.JSON, nullable=True),  # {code, message} when failed
    sa.Column("summary", sa.JSON, nullable=True),  # per criterion, with its interval, when finished
    sa.Column("seed", sa.Integer, nullable=False, default=0),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("passed", sa.Integer, nullable=False, default=0),
    sa.Column("failed", sa.Integer, nullable=False, default=0),
    sa.Column("errored", sa.Integer, nullable=False, default=0),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("cached_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("invocations", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("finished_at", sa.Integer, nullable=True),
)

items = sa.Table(
    "eval_run_items",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(48), unique=True, nullable=False),  # outputitem-<hex>
    sa.Column("run_id", sa.String(40), nullable=False),
    sa.Column("idx", sa.Integer, nullable=False),  # datasource_item_id: the item's place in the source
    sa.Column("item", sa.JSON, nullable=False),  # {item, sample?} as the source gave it
    sa.Column("done", sa.Boolean, nullable=False, default=False),
    sa.Column("status", sa.String(8), nullable=True),  # pass | fail | error, once done
    sa.Column("results", sa.JSON, nullable=True),
    sa.Column("sample", sa.JSON, nullable=True),
    sa.Column("created_at", sa.Integer, nullable=True),  # when graded
    sa.UniqueConstraint("run_id", "idx", name="uq_eval_run_items_idx"),
    sa.Index("ix_eval_run_items_pending", "run_id", "done", "idx"),
)


def get(store: db.Store, table: sa.Table, id: str) -> dict | None:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(table).where(table.c.id == id)).first()
    return None if row is None else dict(row._mapping)


def insert_eval(store: db.Store, row: dict) -> dict:
    with store.tx() as conn:
        conn.execute(evals.insert().values(**row))
    return get(store, evals, row["id"])


def update_eval(store: db.Store, eval_id: str, values: dict) -> dict:
    with store.tx() as conn:
        conn.execute(evals.update().where(evals.c.id == eval_id).values(**values))
    return get(store, evals, eval_id)


def insert_run(store: db.Store, row: dict, source_items: list[dict]) -> dict:
    """The run and its items, pending, in one transaction: acknowledged means all of it is on disk."""
    with store.tx() as conn:
        conn.execute(runs.insert().values(**row, total=len(source_items)))
        if source_items:
            conn.execute(
                items.insert(),
                [
                    {"id": db.new_id("outputitem"), "run_id": row["id"], "idx": i, "item": it, "done": False}
                    for i, it in enumerate(source_items)
                ],
            )
    return get(store, runs, row["id"])


def set_status(store: db.Store, run_id: str, values: dict, only_if: tuple[str, ...]) -> bool:
    """Move a run on, only from one of `only_if` (a cancel is never overwritten)."""
    query = runs.update().where(runs.c.id == run_id, runs.c.status.in_(only_if))
    with store.tx() as conn:
        return conn.execute(query.values(**values)).rowcount == 1


def pending(store: db.Store, run_id: str) -> list[dict]:
    query = (
        sa.select(items.c.idx, items.c.item)
        .where(items.c.run_id == run_id, items.c.done.is_(False))
        .order_by(items.c.idx)
    )
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def record(store: db.Store, run_id: str, idx: int, answer: dict, usage: dict) -> bool:
    """An item's grade and its count on the run, in one transaction. False if it had been recorded."""
    c = runs.c
    with store.tx() as conn:
        done = conn.execute(
            items.update()
            .where(items.c.run_id == run_id, items.c.idx == idx, items.c.done.is_(False))
            .values(done=True, created_at=db.now(), **answer)
        ).rowcount
        if done != 1:
            return False
        status = answer["status"]
        conn.execute(
            runs.update()
            .where(c.id == run_id)
            .values(
                passed=c.passed + int(status == "pass"),
                failed=c.failed + int(status == "fail"),
                errored=c.errored + int(status == "error"),
                prompt_tokens=c.prompt_tokens + usage.get("prompt_tokens", 0),
                completion_tokens=c.completion_tokens + usage.get("completion_tokens", 0),
                cached_tokens=c.cached_tokens + usage.get("cached_tokens", 0),
                invocations=c.invocations + usage.get("invocations", 0),
            )
        )
    return True


def graded(store: db.Store, run_id: str) -> list[dict]:
    """The results of every graded item of the run, in source order (what a summary is computed from)."""
    query = (
        sa.select(items.c.idx, items.c.results)
        .where(items.c.run_id == run_id, items.c.done.is_(True))
        .order_by(items.c.idx)
    )
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def active(store: db.Store) -> list[dict]:
    query = sa.select(runs.c.id).where(runs.c.status.in_(ACTIVE)).order_by(runs.c.seq)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def delete_run(store: db.Store, run_id: str) -> None:
    with store.tx() as conn:
        conn.execute(items.delete().where(items.c.run_id == run_id))
        conn.execute(runs.delete().where(runs.c.id == run_id))


def delete_eval(store: db.Store, eval_id: str) -> None:
    """The eval, its runs and their items."""
    with store.tx() as conn:
        run_ids = sa.select(runs.c.id).where(runs.c.eval_id == eval_id)
        conn.execute(items.delete().where(items.c.run_id.in_(run_ids)))
        conn.execute(runs.delete().where(runs.c.eval_id == eval_id))
        conn.execute(evals.delete().where(evals.c.id == eval_id))
