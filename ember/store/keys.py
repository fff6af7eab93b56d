"""The gateway's tables (issue 24): virtual keys (stored hashed), each key's spend per budget period, and
the usage ledger, one row per metered request.

A virtual key's owner id (the `tenant` every stored object is keyed by) is derived as for --api-key keys,
"key-" + sha256(key)[:16], so it is the first 16 hex digits of `key_hash`: computed once at creation and
stored, it names the key's objects across restarts without the key itself.
"""

from __future__ import annotations

import sqlalchemy as sa

from ember.store import db

virtual_keys = sa.Table(
    "virtual_keys",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "id", sa.String(40), unique=True, nullable=False
    ),  # vk-...: what admins, metrics and usage name
    sa.Column("key_hash", sa.String(64), unique=True, nullable=False),  # sha256 of the key, hex
    sa.Column("tenant", sa.String(40), nullable=False, index=True),  # "key-" + key_hash[:16]
    sa.Column("prefix", sa.String(16), nullable=False),  # the key's first characters, to tell keys apart
    sa.Column("name", sa.String(256), nullable=True),
    sa.Column("owner", sa.String(256), nullable=True),
    sa.Column("team", sa.String(256), nullable=True, index=True),
    sa.Column("models", sa.JSON, nullable=True),  # list[str] the key may call; None: every model
    sa.Column("rpm", sa.BigInteger, nullable=True),  # requests per minute; None: no limit
    sa.Column("tpm", sa.BigInteger, nullable=True),  # tokens per minute; None: no limit
    sa.Column("budget", sa.Float, nullable=True),  # in `budget_unit` per `budget_period`; None: none
    sa.Column("budget_unit", sa.String(8), nullable=False),  # tokens | usd
    sa.Column("budget_period", sa.String(8), nullable=False),  # day | month | total (UTC)
    sa.Column("revoked", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.Integer, nullable=False),
)

# What a key has spent and holds reserved in one budget period ("2026-12-03", "2026-12" or "total").
# Admission adds its estimate to `reserved` in one conditional UPDATE, so replicas on one database agree.
key_spend = sa.Table(
    "key_spend",
    db.meta,
    sa.Column("key_id", sa.String(40), primary_key=True),
    sa.Column("period", sa.String(16), primary_key=True),
    sa.Column("spent", sa.Float, nullable=False),
    sa.Column("reserved", sa.Float, nullable=False),
)

usage = sa.Table(
    "usage",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Integer, nullable=False, index=True),
    sa.Column("tenant", sa.String(40), nullable=True, index=True),  # who called; None: an open server
    sa.Column("key_id", sa.String(40), nullable=True, index=True),  # virtual key id, or the tenant id
    sa.Column("team", sa.String(256), nullable=True, index=True),
    sa.Column("model", sa.String(256), nullable=False, index=True),
    sa.Column("endpoint", sa.String(64), nullable=False),  # /v1/chat/completions, ...
    sa.Column("batch", sa.Boolean, nullable=False),  # a batch line: priced with the batch discount
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("cached_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("trained_tokens", sa.Integer, nullable=False),  # a fine-tuning job's
    sa.Column("cost", sa.Float, nullable=False),  # USD, from the price table
    sa.Column("ref", sa.String(64), nullable=True, unique=True),  # the job a fine-tuning row is for
    sa.Column("status", sa.Integer, nullable=False),  # 200, or the error status after admission
)
