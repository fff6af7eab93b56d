"""Stored responses (`store: true`, OpenAI's default): the response object, the items of its own input, and
the conversation before it, so that previous_response_id can rebuild what the model read. A response
belongs to the key that made it; to every other key it does not exist.
"""

from __future__ import annotations

import sqlalchemy as sa

from ember.store import db
from ember.store.db import Store

responses = sa.Table(
    "responses",
    db.meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), unique=True, nullable=False),
    sa.Column("tenant", sa.String(40), nullable=True, index=True),  # ServerState.tenant; None: open server
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("previous_response_id", sa.String(64), nullable=True),
    sa.Column("history", sa.JSON, nullable=False),  # items before this input (earlier turns, outputs too)
    sa.Column("input", sa.JSON, nullable=False),  # this request's input items, with ids
    sa.Column("response", sa.JSON, nullable=False),  # the response object; output items keep `_turn`
)


def save(store: Store, tenant: str | None, response: dict, history: list[dict], input: list[dict]) -> None:
    store.insert(
        responses,
        {
            "id": response["id"],
            "tenant": tenant,
            "created_at": int(response["created_at"]),
            "model": response["model"],
            "status": response["status"],
            "previous_response_id": response.get("previous_response_id"),
            "history": history,
            "input": input,
            "response": response,
        },
    )


def owned(store: Store, response_id: str, tenant: str | None) -> dict | None:
    """The row of `response_id` if `tenant` made it, else None (another key's response too)."""
    row = store.get(responses, response_id)
    return row if row is not None and row["tenant"] == tenant else None


def conversation(row: dict) -> list[dict]:
    """Every item of a stored response's conversation, its output last: what a continuation follows."""
    return [*row["history"], *row["input"], *row["response"]["output"]]
