"""Deployment aliases (issue 20): a stable model name (`support-bot`) -> what it serves now, with every
version it has served. One `aliases` row per alias holds its current version number; one `alias_versions`
row per version holds the target: the base model, the adapter as the admin named it (a loaded adapter or a
fine-tuned model `ft:...`), the directory it loads from, and the name the engine serves it under.

A new version and the alias row's move to it commit in one transaction, guarded by the version the caller
read (compare and swap): two repoints never both win, and what was acknowledged survives a restart.
"""

from __future__ import annotations

import sqlalchemy as sa

from ember.store import db

aliases = sa.Table(
    "aliases",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), unique=True, nullable=False),  # the alias name, as clients send it
    sa.Column("version", sa.Integer, nullable=False),  # the current version
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.Integer, nullable=False),
)

versions = sa.Table(
    "alias_versions",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("model", sa.String(256), nullable=False),  # the base model
    sa.Column("source", sa.String(20), nullable=False),  # base | adapter | fine_tuned_model | adapter_path
    sa.Column("adapter", sa.String(256), nullable=True),  # as the admin named it; None: base or a path
    sa.Column("path", sa.String(1024), nullable=True),  # the adapter directory; None: the base model
    sa.Column("served_as", sa.String(256), nullable=True),  # the engine's adapter name; None: the base
    sa.Column("metadata", sa.JSON, nullable=True),  # dict[str, str]: why this version (a job, an eval run)
    sa.UniqueConstraint("alias", "version", name="uq_alias_versions"),
)


class VersionConflict(Exception):
    """The alias is not at the version the caller expected (another repoint or a delete came first)."""


def add_version(store: db.Store, name: str, expected: int | None, row: dict) -> dict:
    """Record version `row["version"]` of alias `name` and make it current, in one transaction: the
    alias is created if `expected` is None, else moved only if it is still at version `expected`."""
    at = row["created_at"]
    with store.tx() as conn:
        if expected is None:
            exists = conn.execute(sa.select(aliases.c.id).where(aliases.c.id == name)).first()
            if exists is not None:
                raise VersionConflict(f"alias '{name}' exists already")
            conn.execute(
                aliases.insert().values(id=name, version=row["version"], created_at=at, updated_at=at)
            )
        else:
            moved = conn.execute(
                aliases.update()
                .where(aliases.c.id == name, aliases.c.version == expected)
                .values(version=row["version"], updated_at=at)
            )
            if moved.rowcount != 1:
                raise VersionConflict(f"alias '{name}' is no longer at version {expected}")
        conn.execute(versions.insert().values(alias=name, **row))
    return row


def remove(store: db.Store, name: str) -> bool:
    """Delete an alias and its history; whether it existed."""
    with store.tx() as conn:
        gone = conn.execute(aliases.delete().where(aliases.c.id == name)).rowcount == 1
        conn.execute(versions.delete().where(versions.c.alias == name))
    return gone


def get(store: db.Store, name: str) -> dict | None:
    """The alias row with its `history` (version rows, newest first), or None."""
    found = load(store, name)
    return found[0] if found else None


def load(store: db.Store, name: str | None = None) -> list[dict]:
    """Every alias (or the one named), oldest first, each with its `history`, newest version first."""
    alias_q = sa.select(aliases).order_by(aliases.c.seq)
    version_q = sa.select(versions).order_by(versions.c.alias, versions.c.version.desc())
    if name is not None:
        alias_q = alias_q.where(aliases.c.id == name)
        version_q = version_q.where(versions.c.alias == name)
    with store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(alias_q)]
        history: dict[str, list[dict]] = {}
        for r in conn.execute(version_q):
            history.setdefault(r.alias, []).append(dict(r._mapping))
    return [{**r, "history": history.get(r["id"], [])} for r in rows]
