"""The host's records: every upgrade outcome with its raw confirmation record,
and the device key registry. In a SQLite file (the embedded default) or on a
PostgreSQL server (``postgresql://...``, for head-ends of several hosts): the
same schema and the same methods over db.Database.

``store.transaction()`` groups writes of the store and the ledger (and of
anything else on the same database) into one transaction:

    with store.transaction():
        store.add(outcome)
        ledger.finish_device(...)
"""

from __future__ import annotations

import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from . import db as dbm
from .db import Database, atomic, reading

# Migrations of the records tables: index i takes schema version i to i + 1.
# Version 1 is the layout from before versioning (CREATE ... IF NOT EXISTS, so
# an unversioned file of that layout is adopted as it is).
MIGRATIONS = [
    """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    key BLOB NOT NULL,
    board TEXT,
    address TEXT,
    last_seq INTEGER NOT NULL DEFAULT 0,
    updated REAL
);
CREATE TABLE IF NOT EXISTS upgrades (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    address TEXT,
    from_version TEXT,
    to_version TEXT,
    image_hash TEXT,
    result TEXT NOT NULL,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    started REAL NOT NULL,
    finished REAL,
    record BLOB,
    mac BLOB,
    verified INTEGER NOT NULL DEFAULT 0,
    campaign TEXT
);
CREATE INDEX IF NOT EXISTS upgrades_device ON upgrades(device);
""",
]
SCHEMA_VERSION = len(MIGRATIONS)


def default_path() -> Path | str:
    """$METEROTA_DB (a file or a postgresql:// URL), else the user's SQLite file."""
    env = os.environ.get("METEROTA_DB")
    if env:
        return env if dbm.is_url(env) else Path(env)
    return dbm.default_path()


@dataclass
class Outcome:
    device: str
    address: str
    from_version: str | None
    to_version: str
    image_hash: str
    result: str  # OK, KO, UNREACHABLE, ERROR
    reason: str
    attempts: int
    started: float
    finished: float
    record: bytes | None = None
    mac: bytes | None = None
    verified: bool = False
    campaign: str | None = None


class Store:
    """The records. `target`: a SQLite path or a postgresql:// URL (default: default_path())."""

    def __init__(self, path: Path | str | None = None, *, reconnect_s: float = dbm.RECONNECT_S):
        target = path if path not in (None, "") else default_path()
        self.db = Database(target, reconnect_s=reconnect_s)
        self.path = self.db.where  # where the records are, for messages (a URL without its password)
        self.lock = self.db.lock
        try:
            self.db.migrate("store", MIGRATIONS)
        except BaseException:
            self.db.close()
            raise

    @property
    def dialect(self) -> str:
        return self.db.dialect

    def transaction(self) -> AbstractContextManager[Database]:
        """One transaction over the store, the ledger and any table of this database."""
        return self.db.transaction()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- key registry ------------------------------------------------------
    @atomic
    def set_key(self, device: str, key: bytes, board: str | None = None, address: str | None = None) -> None:
        self.db.execute(
            "INSERT INTO devices(id, key, board, address, updated) VALUES(?,?,?,?,?) "
            "ON CONFLICT(id) DO UPDATE SET key=excluded.key, board=COALESCE(excluded.board, devices.board), "
            "address=COALESCE(excluded.address, devices.address), updated=excluded.updated",
            (device, key, board, address, time.time()))

    @reading
    def key(self, device: str) -> bytes | None:
        row = self.db.execute("SELECT key FROM devices WHERE id=?", (device,)).one()
        return bytes(row["key"]) if row else None

    @reading
    def last_seq(self, device: str) -> int:
        row = self.db.execute("SELECT last_seq FROM devices WHERE id=?", (device,)).one()
        return int(row["last_seq"]) if row else 0

    @atomic
    def note_seq(self, device: str, seq: int) -> None:
        self.db.execute("UPDATE devices SET last_seq=? WHERE id=? AND last_seq<?", (seq, device, seq))

    # -- outcomes ------------------------------------------------------------
    @atomic
    def add(self, o: Outcome) -> int:
        row = self.db.execute(
            "INSERT INTO upgrades(device, address, from_version, to_version, image_hash, result, reason, "
            "attempts, started, finished, record, mac, verified, campaign) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "RETURNING id",
            (o.device, o.address, o.from_version, o.to_version, o.image_hash, o.result, o.reason, o.attempts,
             o.started, o.finished, o.record, o.mac, int(o.verified), o.campaign)).one()
        return int(row["id"]) if row else 0

    def outcomes(self, device: str | None = None, limit: int = 100) -> Iterator[dict[str, Any]]:
        q = "SELECT * FROM upgrades" + (" WHERE device=?" if device else "") + " ORDER BY id DESC LIMIT ?"
        args: tuple[Any, ...] = (device, limit) if device else (limit,)
        for d in self.db.rows(q, args):
            for k in ("record", "mac"):
                if d[k] is not None:
                    d[k] = bytes(d[k]).hex()
            yield d
