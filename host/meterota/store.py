"""The host's records: a SQLite file (the embedded default) holding every
upgrade outcome with its raw confirmation record, and the device key registry."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from .events import Message

SCHEMA = """
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
-- The event stream's outbox (events.py, publish.py): rows are written in the transaction that
-- records the outcome, and marked sent only once the broker acknowledged them (PUBACK).
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the order of sending
    msg_id TEXT NOT NULL UNIQUE,           -- the message id consumers de-duplicate by
    topic TEXT NOT NULL,                   -- relative to the broker URL's prefix
    kind TEXT NOT NULL,                    -- upgrade | workorder | campaign
    retain INTEGER NOT NULL DEFAULT 0,
    payload TEXT NOT NULL,                 -- JSON, docs/events.md
    created REAL NOT NULL,
    sent REAL                              -- NULL until acknowledged
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox(sent, id);
"""


def default_path() -> Path:
    env = os.environ.get("METEROTA_DB")
    if env:
        return Path(env)
    return Path.home() / ".local" / "share" / "meterota" / "meterota.db"


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
    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by a campaign's worker threads, serialised here.
        self.db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.lock = threading.RLock()
        self._tx_depth = 0
        # Outcomes also become outbox messages while a publisher is configured (enable_outbox).
        self.outbox_enabled = False
        self.outbox_changed = threading.Event()
        with self.lock, self.db:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction for everything inside, however deeply nested: the outermost
        commits (or rolls back on an exception); inner ones join it."""
        with self.lock:
            if self._tx_depth:
                self._tx_depth += 1
                try:
                    yield self.db
                finally:
                    self._tx_depth -= 1
                return
            self._tx_depth = 1
            try:
                with self.db:
                    yield self.db
            finally:
                self._tx_depth = 0
            if self.outbox_enabled:
                self.outbox_changed.set()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- key registry ------------------------------------------------------
    def set_key(self, device: str, key: bytes, board: str | None = None, address: str | None = None) -> None:
        with self.lock, self.db:
            self.db.execute(
                "INSERT INTO devices(id, key, board, address, updated) VALUES(?,?,?,?,?) "
                "ON CONFLICT(id) DO UPDATE SET key=excluded.key, board=COALESCE(excluded.board, board), "
                "address=COALESCE(excluded.address, address), updated=excluded.updated",
                (device, key, board, address, time.time()))

    def key(self, device: str) -> bytes | None:
        with self.lock:
            row = self.db.execute("SELECT key FROM devices WHERE id=?", (device,)).fetchone()
        return bytes(row["key"]) if row else None

    def last_seq(self, device: str) -> int:
        with self.lock:
            row = self.db.execute("SELECT last_seq FROM devices WHERE id=?", (device,)).fetchone()
        return int(row["last_seq"]) if row else 0

    def note_seq(self, device: str, seq: int) -> None:
        with self.lock, self.db:
            self.db.execute("UPDATE devices SET last_seq=MAX(last_seq, ?) WHERE id=?", (seq, device))

    # -- outcomes ------------------------------------------------------------
    def add(self, o: Outcome, *, publish: bool | None = None) -> int:
        """Record an outcome. With the outbox enabled it is also a message, in the same
        transaction, when `publish` says so; by default when it belongs to no campaign
        (a campaign's outcomes are published by its ledger, which records them too)."""
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO upgrades(device, address, from_version, to_version, image_hash, result, reason, "
                "attempts, started, finished, record, mac, verified, campaign) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (o.device, o.address, o.from_version, o.to_version, o.image_hash, o.result, o.reason, o.attempts,
                 o.started, o.finished, o.record, o.mac, int(o.verified), o.campaign))
            rid = int(cur.lastrowid or 0)
            if self.outbox_enabled and (publish if publish is not None else o.campaign is None):
                from .events import record_outcome

                self.outbox_put([record_outcome(o, rid)])
            return rid

    def outcomes(self, device: str | None = None, limit: int = 100) -> Iterator[dict[str, Any]]:
        q = "SELECT * FROM upgrades" + (" WHERE device=?" if device else "") + " ORDER BY id DESC LIMIT ?"
        args: tuple[Any, ...] = (device, limit) if device else (limit,)
        with self.lock:
            rows = self.db.execute(q, args).fetchall()
        for row in rows:
            d = dict(row)
            for k in ("record", "mac"):
                if d[k] is not None:
                    d[k] = bytes(d[k]).hex()
            yield d

    # -- the event outbox ------------------------------------------------------
    def enable_outbox(self) -> None:
        self.outbox_enabled = True

    def outbox_put(self, messages: "list[Message]") -> None:
        """Queue messages in the caller's transaction (or one of their own)."""
        now = time.time()
        with self.transaction():
            self.db.executemany(
                "INSERT INTO outbox(msg_id, topic, kind, retain, payload, created) VALUES(?,?,?,?,?,?)",
                [(m.msg_id, m.topic, m.kind, int(m.retain), m.payload, now) for m in messages])

    def outbox_unsent(self, limit: int = 100) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.db.execute(
                "SELECT id, msg_id, topic, kind, retain, payload FROM outbox WHERE sent IS NULL ORDER BY id LIMIT ?",
                (limit,))]

    def outbox_mark_sent(self, ids: list[int]) -> None:
        if not ids:
            return
        now = time.time()
        with self.lock, self.db:
            self.db.executemany("UPDATE outbox SET sent=? WHERE id=?", [(now, i) for i in ids])

    def outbox_counts(self) -> dict[str, int]:
        with self.lock:
            r = self.db.execute("SELECT COUNT(*) AS n, COUNT(sent) AS s FROM outbox").fetchone()
        return {"sent": int(r["s"]), "unsent": int(r["n"]) - int(r["s"])}
