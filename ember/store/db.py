"""The database: tables for files, fine-tuning jobs, their events and checkpoints, over SQLAlchemy Core, so
SQLite (embedded, the default) and PostgreSQL are one code path. Every write commits before it returns:
what the API has acknowledged survives a crash (SQLite in WAL mode with synchronous=FULL).

Schema changes: tables are created when missing (`create_all`); a column added later needs a migration
step here, keyed on the `schema_version` row.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

SCHEMA_VERSION = 1

meta = sa.MetaData()

files = sa.Table(
    "files",
    meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), unique=True, nullable=False),
    sa.Column("tenant", sa.String(40), nullable=True, index=True),  # ServerState.tenant; None: open server
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("purpose", sa.String(40), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("expires_at", sa.Integer, nullable=True),
)

jobs = sa.Table(
    "jobs",
    meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), unique=True, nullable=False),
    sa.Column("tenant", sa.String(40), nullable=True, index=True),
    sa.Column("owner", sa.String(40), nullable=True),  # who the adapter is served to; None: every key
    sa.Column("model", sa.String(256), nullable=False),  # the base model, as the client named it
    sa.Column("source", sa.String(1024), nullable=False),  # what the trainer loads (catalog name, path)
    sa.Column("training_file", sa.String(40), nullable=False),
    sa.Column("validation_file", sa.String(40), nullable=True),
    sa.Column("spec", sa.Text, nullable=False),  # JSON: method, hyperparameters, lora, max_len, ...
    sa.Column("suffix", sa.String(64), nullable=True),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("metadata", sa.Text, nullable=True),  # JSON
    sa.Column("status", sa.String(20), nullable=False, index=True),
    sa.Column("error", sa.Text, nullable=True),  # JSON {code, message, param}
    sa.Column("fine_tuned_model", sa.String(256), nullable=True),
    sa.Column("adapter_dir", sa.String(1024), nullable=True),  # set by the worker when training is done
    sa.Column("trained_tokens", sa.BigInteger, nullable=True),
    sa.Column("estimated_finish", sa.Integer, nullable=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("finished_at", sa.Integer, nullable=True),
)

events = sa.Table(
    "job_events",
    meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), unique=True, nullable=False),
    sa.Column("job_id", sa.String(40), nullable=False, index=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("level", sa.String(8), nullable=False),
    sa.Column("type", sa.String(10), nullable=False),  # message | metrics
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("data", sa.Text, nullable=True),  # JSON
)

checkpoints = sa.Table(
    "job_checkpoints",
    meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), unique=True, nullable=False),
    sa.Column("job_id", sa.String(40), nullable=False, index=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("step_number", sa.Integer, nullable=False),
    sa.Column("path", sa.String(1024), nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),  # JSON
)

versions = sa.Table("schema_version", meta, sa.Column("version", sa.Integer, nullable=False))

# The platform features' tables are declared in their own modules on `meta` (with sa.JSON columns for
# JSON); `connect` imports those that exist before it creates what is missing.
FEATURE_TABLES = (
    "ember.store.traces",
    "ember.store.aliases",
    "ember.store.evals",
    "ember.store.responses",
    "ember.store.batches",
    "ember.store.keys",
    "ember.store.flywheel",
)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def connect(url: str) -> sa.Engine:
    """An engine for `url` with the tables in place. SQLite: the file's directory is made, WAL journal
    (readers do not block the worker's writes), synchronous=FULL (a commit is on disk), a busy timeout
    (two processes write: the server and the training worker)."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, future=True)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _pragmas(conn, _record) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

    for name in FEATURE_TABLES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    meta.create_all(engine)
    with engine.begin() as conn:
        if conn.execute(sa.select(versions)).first() is None:
            conn.execute(versions.insert().values(version=SCHEMA_VERSION))
    return engine


class Store:
    """The rows the files and fine-tuning API keep. Methods take and return plain dicts (JSON columns
    decoded)."""

    JSON_COLUMNS = ("spec", "metadata", "error", "data", "metrics")

    def __init__(self, url: str):
        self.url = url
        self.engine = connect(url)

    @contextmanager
    def tx(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as conn:  # commits on leaving, before the caller answers
            yield conn

    @classmethod
    def _row(cls, row) -> dict:
        out = dict(row._mapping)
        for key in cls.JSON_COLUMNS:
            if key in out and isinstance(out[key], str):
                out[key] = json.loads(out[key])
        return out

    @staticmethod
    def _encode(values: dict) -> dict:
        return {
            k: json.dumps(v) if k in Store.JSON_COLUMNS and v is not None else v for k, v in values.items()
        }

    def insert(self, table: sa.Table, values: dict) -> dict:
        with self.tx() as conn:
            conn.execute(table.insert().values(**self._encode(values)))
        return self.get(table, values["id"])

    def get(self, table: sa.Table, id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(table.c.id == id)).first()
        return None if row is None else self._row(row)

    def update(self, table: sa.Table, id: str, values: dict, only_if_status: tuple[str, ...] = ()) -> bool:
        """Update one row; with `only_if_status`, only while its status is one of those (a worker never
        overwrites a cancel or a restart's verdict). Whether a row changed."""
        query = table.update().where(table.c.id == id)
        if only_if_status:
            query = query.where(table.c.status.in_(only_if_status))
        with self.tx() as conn:
            return conn.execute(query.values(**self._encode(values))).rowcount == 1

    def delete(self, table: sa.Table, id: str) -> None:
        with self.tx() as conn:
            conn.execute(table.delete().where(table.c.id == id))

    def page(
        self, table: sa.Table, where: list, after: str | None, limit: int, newest_first: bool = True
    ) -> tuple[list[dict], bool]:
        """Rows matching `where`, after the row with id `after` (in the listing's order), at most `limit`;
        and whether there are more."""
        order = table.c.seq.desc() if newest_first else table.c.seq.asc()
        query = sa.select(table).where(*where)
        with self.engine.connect() as conn:
            if after is not None:
                seq = conn.execute(sa.select(table.c.seq).where(table.c.id == after)).scalar()
                if seq is not None:
                    query = query.where(table.c.seq < seq if newest_first else table.c.seq > seq)
            rows = conn.execute(query.order_by(order).limit(limit + 1)).all()
        return [self._row(r) for r in rows[:limit]], len(rows) > limit

    def jobs_in(self, *statuses: str) -> list[dict]:
        """Jobs in these statuses, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).where(jobs.c.status.in_(statuses)).order_by(jobs.c.seq)).all()
        return [self._row(r) for r in rows]

    def add_event(
        self, job_id: str, message: str, level: str = "info", type: str = "message", data=None
    ) -> None:
        self.insert(
            events,
            {
                "id": new_id("ftevent"),
                "job_id": job_id,
                "created_at": now(),
                "level": level,
                "type": type,
                "message": message,
                "data": data,
            },
        )
