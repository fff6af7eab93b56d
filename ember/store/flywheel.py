"""The flywheel's rows: one per run (traces -> dataset -> tune -> evaluate -> gate -> promote -> report) and
its events. A run's row holds what each step produced (the dataset file, the fine-tuning job, the
comparison, the decision, the report) as it is produced, so a restarted runner resumes at the first step
without a result and never redoes one that has one.
"""

from __future__ import annotations

import sqlalchemy as sa

from ember.store import db

ACTIVE = ("queued", "running")  # the runner has work on these; then completed, failed or cancelled
STEPS = ("dataset", "tune", "evaluate", "gate", "promote")  # then the report, written either way

runs = sa.Table(
    "flywheel_runs",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), unique=True, nullable=False),
    sa.Column("tenant", sa.String(40), nullable=True, index=True),
    sa.Column("alias", sa.String(256), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),  # the checked request: traces, relabel, eval, tuning, gate
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("step", sa.String(16), nullable=True),  # the step running now (STEPS)
    sa.Column("steps", sa.JSON, nullable=False),  # step -> {status, started_at, finished_at, detail}
    sa.Column("dataset", sa.JSON, nullable=True),  # {file_id, examples, ...}
    sa.Column("job_id", sa.String(40), nullable=True),  # the fine-tuning job
    sa.Column("candidate", sa.String(256), nullable=True),  # the fine-tuned model's name
    sa.Column("baseline", sa.JSON, nullable=True),  # what the alias served when the run evaluated
    sa.Column("comparison", sa.JSON, nullable=True),
    sa.Column("decision", sa.JSON, nullable=True),  # {promote, reasons, ...}
    sa.Column("promoted", sa.JSON, nullable=True),  # the alias after the repoint
    sa.Column("report", sa.Text, nullable=True),  # markdown
    sa.Column("failure", sa.JSON, nullable=True),  # {code, message}
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("finished_at", sa.Integer, nullable=True),
)

events = sa.Table(
    "flywheel_events",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), unique=True, nullable=False),
    sa.Column("run_id", sa.String(40), nullable=False, index=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("level", sa.String(8), nullable=False),
    sa.Column("step", sa.String(16), nullable=True),
    sa.Column("message", sa.Text, nullable=False),
)


def insert(store: db.Store, row: dict) -> dict:
    with store.tx() as conn:
        conn.execute(runs.insert().values(**row))
    return get(store, row["id"])


def get(store: db.Store, run_id: str) -> dict | None:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).first()
    return None if row is None else dict(row._mapping)


def update(store: db.Store, run_id: str, values: dict, only_if: tuple[str, ...] = ACTIVE) -> bool:
    """Write a step's result, only while the run is in `only_if` (a cancel is never overwritten)."""
    query = runs.update().where(runs.c.id == run_id, runs.c.status.in_(only_if))
    with store.tx() as conn:
        return conn.execute(query.values(**values)).rowcount == 1


def active(store: db.Store) -> list[str]:
    """The ids of the runs the runner has work on, oldest first."""
    query = sa.select(runs.c.id).where(runs.c.status.in_(ACTIVE)).order_by(runs.c.seq)
    with store.engine.connect() as conn:
        return [r[0] for r in conn.execute(query)]


def add_event(
    store: db.Store, run_id: str, message: str, step: str | None = None, level: str = "info"
) -> None:
    row = {
        "id": db.new_id("fwevent"),
        "run_id": run_id,
        "created_at": db.now(),
        "level": level,
        "step": step,
        "message": message,
    }
    with store.tx() as conn:
        conn.execute(events.insert().values(**row))


def list_events(store: db.Store, run_id: str, after: int = 0, limit: int = 1000) -> list[dict]:
    """The run's events in order, those with seq > `after` (a client following progress passes the last
    one it saw)."""
    query = (
        sa.select(events)
        .where(events.c.run_id == run_id, events.c.seq > after)
        .order_by(events.c.seq)
        .limit(limit)
    )
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]
