"""Virtual keys: created by the admin, stored as the sha256 of a high-entropy secret, looked up by that
hash (so no comparison ever runs over the key's characters; the hash lookup is the constant-time check),
and read from the database at most CACHE_S old, so a key revoked on one replica stops on every replica
sharing the database within that time (on the replica that revoked it, at once).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from ember.store.db import Store, new_id, now
from ember.store.keys import virtual_keys

CACHE_S = 1.0  # the longest a key's row (revoked or not) is trusted without reading the database again
KEY_PREFIX = "sk-ember-"
UNITS = ("tokens", "usd")
PERIODS = ("day", "month", "total")
MAX_LIMIT = 10**15  # per minute: far past any real limit, well inside a BIGINT
EDITABLE = ("name", "owner", "team", "models", "rpm", "tpm", "budget", "budget_unit", "budget_period")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def tenant_of_hash(key_hash: str) -> str:
    """The owner id of a key with this hash: what ServerState.tenant derives from the key itself."""
    return "key-" + key_hash[:16]


@dataclass(frozen=True)
class VirtualKey:
    """A key's row, without its hash."""

    id: str
    tenant: str
    prefix: str
    name: str | None
    owner: str | None
    team: str | None
    models: list[str] | None
    rpm: int | None
    tpm: int | None
    budget: float | None
    budget_unit: str
    budget_period: str
    revoked: bool
    created_at: int
    updated_at: int

    @classmethod
    def of(cls, row) -> VirtualKey:
        m = dict(row._mapping)
        return cls(**{k: m[k] for k in cls.__dataclass_fields__})

    def card(self) -> dict:
        """What the admin API shows: everything but the key (and its hash)."""
        return {"object": "virtual_key", **{k: getattr(self, k) for k in self.__dataclass_fields__}}


def check_settings(values: dict) -> dict:
    """The editable settings of a key, checked; a ValueError naming the field otherwise."""
    unknown = set(values) - set(EDITABLE)
    if unknown:
        raise ValueError(f"unknown key setting '{sorted(unknown)[0]}'; known: {', '.join(EDITABLE)}")
    for name in ("rpm", "tpm"):
        v = values.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_LIMIT):
            raise ValueError(f"'{name}' must be an integer in 1..{MAX_LIMIT} or null (got {v!r})")
    b = values.get("budget")
    if b is not None and (isinstance(b, bool) or not isinstance(b, int | float) or not 0 <= b <= 1e18):
        raise ValueError(f"'budget' must be a non-negative number or null (got {b!r})")
    if values.get("budget_unit", "tokens") not in UNITS:
        raise ValueError(f"'budget_unit' must be one of {', '.join(UNITS)}")
    if values.get("budget_period", "total") not in PERIODS:
        raise ValueError(f"'budget_period' must be one of {', '.join(PERIODS)}")
    models = values.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise ValueError("'models' must be a list of model names or null (every model)")
    for name in ("name", "owner", "team"):
        v = values.get(name)
        if v is not None and (not isinstance(v, str) or len(v) > 256):
            raise ValueError(f"'{name}' must be a string of at most 256 characters")
    return values


class KeyRing:
    """The virtual keys of one database, with a short read cache."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.clock = clock
        self._cache: dict[str, tuple[float, VirtualKey | None]] = {}  # key hash -> (read at, row)
        self._tenants: dict[str, tuple[float, VirtualKey | None]] = {}  # owner id -> (read at, row)
        self._any: tuple[float, bool] | None = None
        self._lock = threading.Lock()

    # -- admin -------------------------------------------------------------------------------------

    def create(self, settings: dict) -> tuple[str, VirtualKey]:
        """A new key and its row; the key itself is returned here only, never stored."""
        values = {"budget_unit": "tokens", "budget_period": "total", **check_settings(dict(settings))}
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(key)
        t = now()
        row = {
            "id": new_id("vk"),
            "key_hash": digest,
            "tenant": tenant_of_hash(digest),
            "prefix": key[: len(KEY_PREFIX) + 4],
            "revoked": False,
            "created_at": t,
            "updated_at": t,
            **{k: None for k in EDITABLE},
            **values,
        }
        with self.store.tx() as conn:
            conn.execute(virtual_keys.insert().values(**row))
        self._any = (self.clock(), True)
        return key, self.get(row["id"])

    def get(self, key_id: str) -> VirtualKey | None:
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(virtual_keys).where(virtual_keys.c.id == key_id)).first()
        return None if row is None else VirtualKey.of(row)

    def list(self, team: str | None = None) -> list[VirtualKey]:
        query = sa.select(virtual_keys).order_by(virtual_keys.c.seq)
        if team is not None:
            query = query.where(virtual_keys.c.team == team)
        with self.store.engine.connect() as conn:
            return [VirtualKey.of(r) for r in conn.execute(query)]

    def update(self, key_id: str, settings: dict) -> VirtualKey | None:
        values = check_settings(dict(settings))
        return self._set(key_id, {**values, "updated_at": now()})

    def revoke(self, key_id: str) -> VirtualKey | None:
        return self._set(key_id, {"revoked": True, "updated_at": now()})

    def _set(self, key_id: str, values: dict) -> VirtualKey | None:
        with self.store.tx() as conn:
            table = virtual_keys
            changed = conn.execute(table.update().where(table.c.id == key_id).values(**values)).rowcount
        with self._lock:  # this replica sees the change at once
            self._cache.clear()
            self._tenants.clear()
        return self.get(key_id) if changed else None

    # -- the gate --------------------------------------------------------------------------------------

    def lookup(self, key: str) -> VirtualKey | None:
        """The row of this key if it is a virtual key, revoked or not (blocking: a database read at most
        every CACHE_S per key)."""
        digest = hash_key(key)
        at = self.clock()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is not None and at - hit[0] <= CACHE_S:
            return hit[1]
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(virtual_keys).where(virtual_keys.c.key_hash == digest)).first()
        found = None if row is None else VirtualKey.of(row)
        with self._lock:
            if len(self._cache) > 100_000:  # wrong keys are cached too: bound what a scan can fill
                self._cache.clear()
            self._cache[digest] = (at, found)
        return found

    def fresh(self, key: str) -> bool:
        """Whether `lookup(key)` would answer from the cache."""
        hit = self._cache.get(hash_key(key))
        return hit is not None and self.clock() - hit[0] <= CACHE_S

    def cached(self, key: str) -> VirtualKey | None:
        """The row `lookup(key)` last read, however old (the gate has just looked it up)."""
        hit = self._cache.get(hash_key(key))
        return hit[1] if hit is not None else None

    def tenant_fresh(self, tenant: str) -> bool:
        hit = self._tenants.get(tenant)
        return hit is not None and self.clock() - hit[0] <= CACHE_S

    def by_tenant(self, tenant: str | None) -> VirtualKey | None:
        """The key whose owner id is `tenant` (work run for a key not in hand: a batch line, or any request
        past the gate), read at most CACHE_S ago; None for a tenant of an --api-key key."""
        if tenant is None:
            return None
        at = self.clock()
        hit = self._tenants.get(tenant)
        if hit is not None and at - hit[0] <= CACHE_S:
            return hit[1]
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(virtual_keys).where(virtual_keys.c.tenant == tenant)).first()
        found = None if row is None else VirtualKey.of(row)
        with self._lock:
            if len(self._tenants) > 100_000:
                self._tenants.clear()
            self._tenants[tenant] = (at, found)
        return found

    def any(self) -> bool:
        """Whether any virtual key was ever made on this database: from then on every request needs a key."""
        at = self.clock()
        if self._any is not None and (self._any[1] or at - self._any[0] <= CACHE_S):
            return self._any[1]
        with self.store.engine.connect() as conn:
            found = conn.execute(sa.select(virtual_keys.c.seq).limit(1)).first() is not None
        self._any = (at, found)
        return found
