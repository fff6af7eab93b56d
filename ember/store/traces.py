"""The `traces` table: stored chat completions (issue 20's capture), one row per completion, written in
batches by ember.traces.recorder and read by the stored-completions routes and ember.traces.select."""

from __future__ import annotations

import sqlalchemy as sa

from ember.store import db

traces = sa.Table(
    "traces",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), unique=True, nullable=False),  # the completion's own id: chatcmpl-...
    sa.Column("tenant", sa.String(40), nullable=True, index=True),  # ServerState.tenant; None: open server
    sa.Column("created_at", sa.Integer, nullable=False, index=True),
    sa.Column("model", sa.String(256), nullable=False, index=True),  # as the client named it
    sa.Column("adapter", sa.String(256), nullable=True),  # the adapter it resolved to; None: the base
    sa.Column("stream", sa.Boolean, nullable=False),
    sa.Column("request", sa.JSON, nullable=False),  # the body as sent, redacted
    sa.Column("response", sa.JSON, nullable=False),  # the chat.completion (a stream's, assembled), redacted
    sa.Column("metadata", sa.JSON, nullable=False),  # dict[str, str]: the request's tags, then update's
    sa.Column("usage", sa.JSON, nullable=True),
    sa.Column("latency_ms", sa.Float, nullable=False),  # the route's start to the last token
    sa.Column("ttft_ms", sa.Float, nullable=True),  # to the first token (server side)
    sa.Column("cached_tokens", sa.Integer, nullable=True),  # prompt tokens from the prefix cache
    sa.Column("score", sa.Float, nullable=True),  # feedback: the latest score
    sa.Column("labels", sa.JSON, nullable=False),  # feedback: list[str], in the order given
)
