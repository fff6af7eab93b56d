"""Budgets in the database, so replicas on one database share them: admission reserves its estimate in
one conditional UPDATE (`spent + reserved < budget`), completion settles (the estimate released, the real
spend added). A key therefore stops once its spend plus what is in flight reaches the budget, and its
spend ends at most at the budget plus the requests in flight at that moment (each at its real size).

A replica that crashes leaves its reservations behind; they hold the key's period back until an admin
raises the budget or the period rolls over.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from ember.gateway.keys import VirtualKey
from ember.gateway.limits import Limited
from ember.store.db import Store
from ember.store.keys import key_spend

PERIOD_NAMES = {"day": "daily", "month": "monthly", "total": "total"}


def period_of(period: str, at: float | None = None) -> str:
    """The budget period a moment falls in (UTC): "2026-12-03", "2026-12" or "total"."""
    if period == "total":
        return "total"
    t = time.gmtime(time.time() if at is None else at)
    return time.strftime("%Y-%m-%d" if period == "day" else "%Y-%m", t)


def ensure(conn: sa.Connection, key_id: str, period: str) -> None:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    row = {"key_id": key_id, "period": period, "spent": 0.0, "reserved": 0.0}
    conn.execute(insert(key_spend).values(**row).on_conflict_do_nothing())


def describe(key: VirtualKey) -> str:
    unit = "tokens" if key.budget_unit == "tokens" else "USD"
    amount = f"{key.budget:g} {unit}" if unit == "tokens" else f"{key.budget:.4f} {unit}"
    return f"{PERIOD_NAMES[key.budget_period]} {key.budget_unit} budget of {amount}"


def reserve(store: Store, key: VirtualKey, amount: float) -> str:
    """Reserve `amount` of the key's budget for one request: the period it was reserved in, or Limited
    (429 budget_exceeded) once the key's spend and reservations have reached its budget."""
    period = period_of(key.budget_period)
    c = key_spend.c
    with store.tx() as conn:
        ensure(conn, key.id, period)
        admitted = conn.execute(
            key_spend.update()
            .where(c.key_id == key.id, c.period == period, c.spent + c.reserved < key.budget)
            .values(reserved=c.reserved + amount)
        ).rowcount
        if admitted:
            return period
        spent = conn.execute(sa.select(c.spent).where(c.key_id == key.id, c.period == period)).scalar()
    raise Limited(
        429,
        f"this key is over its {describe(key)} (spent {spent:g} this period); ask an admin to raise "
        "it" + ("" if key.budget_period == "total" else " or wait for the next period"),
        "budget_exceeded",
    )


def settle(conn: sa.Connection, key_id: str, period: str, reserved: float, spent: float) -> None:
    """Release a reservation and add the real spend (in the usage writer's transaction)."""
    c = key_spend.c
    conn.execute(
        key_spend.update()
        .where(c.key_id == key_id, c.period == period)
        .values(reserved=c.reserved - reserved, spent=c.spent + spent)
    )


def spend_of(store: Store, key: VirtualKey) -> dict:
    """The key's current period: spent and reserved."""
    period = period_of(key.budget_period)
    c = key_spend.c
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(c.spent, c.reserved).where(c.key_id == key.id, c.period == period)
        ).first()
    spent, reserved = (row.spent, row.reserved) if row is not None else (0.0, 0.0)
    return {"period": period, "spent": spent, "reserved": reserved}
