"""The host's records: every upgrade outcome with its raw confirmation record,
and the device key registry. In a SQLite file (the embedded default) or on a
PostgreSQL server (``postgresql://...``, for head-ends of several hosts): the
same schema and the same methods over db.Database.

``store.transaction()`` groups writes of the store and the ledger (and of
anything else on the same database) into one transaction:

    with store.transaction():
        store.add(outcome)
        ledger.finish_device(...)

Store.record is the one door into the records: it refuses an OK without a
verified OK record (confirm.check_outcome), a record not newer than the last
one recorded for its device (a replay: StaleRecord), and it recognises what is
already recorded (the same device, sequence number and MAC, or the same relayed
result) instead of writing it twice, all in one write transaction, so two
hosts racing on one device cannot both record the same record. When the
database stays locked or read-only past METEROTA_DB_WAIT seconds, the outcome
is appended to a spool file beside it and NotRecorded (exit 10) says how to
import it (`meterota records import`)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from . import db as dbm
from .confirm import Confirmation, check_outcome
from .db import Database, DatabaseError, atomic, reading
from .errors import MeterotaError, NotRecorded, StaleRecord

if TYPE_CHECKING:
    from .events import Message

T = TypeVar("T")

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
    # 2: the record freshness columns: a verified record's sequence number and a
    # relayed result's identity, each unique (files that got the columns before
    # versions existed keep them: the step adds only what is missing).
    lambda db: (db.add_columns("upgrades", ["seq INTEGER", "ref TEXT"]), db.script(INDEXES)),
    # 3: the event stream's outbox (events.py, publish.py): rows are written in the transaction that
    # records the outcome, and marked sent only once the broker acknowledged them (PUBACK).
    """
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
-- One publisher drains the outbox at a time (any number of processes and hosts may publish):
-- the holder of this lease, renewed with each window; a dead holder's lease is taken over.
CREATE TABLE IF NOT EXISTS outbox_drain (
    id INTEGER PRIMARY KEY,
    owner TEXT,                            -- host:pid:token of the publisher
    expires REAL                           -- epoch seconds, the database's clock
);
INSERT INTO outbox_drain(id) VALUES(1) ON CONFLICT(id) DO NOTHING;
""",
]
SCHEMA_VERSION = len(MIGRATIONS)

# Record freshness: one row per device record and per relayed result.
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS upgrades_record ON upgrades(device, seq) WHERE seq IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS upgrades_ref ON upgrades(ref) WHERE ref IS NOT NULL;
"""


def db_wait() -> float:
    """Seconds a write waits for a locked database before the outcome is spooled."""
    try:
        return max(0.0, float(os.environ.get("METEROTA_DB_WAIT", "30")))
    except ValueError:
        return 30.0


@dataclass
class Recorded:
    id: int
    duplicate: bool = False  # already in the records (same record, or same relayed result): not written again


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
        self.wait = db_wait()
        self.db = Database(target, reconnect_s=reconnect_s, busy_s=self.wait)
        self.path = self.db.where  # where the records are, for messages (a URL without its password)
        self.lock = self.db.lock
        # Outcomes also become outbox messages while a publisher is configured (enable_outbox).
        self.outbox_enabled = False
        self.outbox_changed = threading.Event()
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

    def newest_seq(self, device: str) -> int:
        """The newest record number known for `device`: its registry entry or
        its recorded records (a device upgraded with --key has no entry)."""
        def go() -> int:
            a = self.db.execute("SELECT last_seq FROM devices WHERE id=?", (device,)).one()
            b = self.db.execute("SELECT MAX(seq) AS n FROM upgrades WHERE device=?", (device,)).one()
            return max(int(a["last_seq"]) if a else 0, int(b["n"] or 0) if b else 0)
        return self.db.run(go, write=False)

    # -- outcomes ------------------------------------------------------------
    def record(self, o: Outcome, conf: Confirmation | None = None, ref: str | None = None,
               spool_extra: dict[str, Any] | None = None, backfill: bool = False,
               publish: bool | None = None) -> Recorded:
        """Record an outcome: the only way into `upgrades` (see the module doc).
        Raises ConfirmationError (an OK without a verified OK record),
        StaleRecord (a replay), NotRecorded (database unwritable: spooled).
        With the outbox enabled a new record is also a message, in the same
        transaction, when `publish` says so; by default when it belongs to no
        campaign (a campaign's outcomes are published by its ledger, which
        records them too)."""
        check_outcome(o.result, conf, o.device, o.image_hash)
        o.record, o.mac, o.verified = (conf.raw, conf.mac, True) if conf else (None, None, False)
        try:
            return self.db.run(lambda: self._record_in_tx(o, conf, ref, backfill, publish))
        except StaleRecord:
            raise
        except (sqlite3.Error, DatabaseError) as e:
            if backfill:  # importing a spool: it stays where it is
                raise NotRecorded(f"{self.path}: {e}") from None
            where = self.spool(o, ref, spool_extra)
            raise NotRecorded(f"{o.device}: {o.result} NOT RECORDED in {self.path}: {e}; saved to {where}: "
                              f"import it with `meterota --db {self.path} records import {where}`") from None

    def _record_in_tx(self, o: Outcome, conf: Confirmation | None, ref: str | None, backfill: bool,
                      publish: bool | None = None) -> Recorded:
        if ref is not None:
            row = self.db.execute("SELECT id FROM upgrades WHERE ref=?", (ref,)).one()
            if row:
                return Recorded(int(row["id"]), duplicate=True)
        if conf is not None:
            row = self.db.execute("SELECT id, mac FROM upgrades WHERE device=? AND seq=?",
                                  (conf.device_id, conf.seq)).one()
            newest = self.newest_seq(conf.device_id)
            if row and bytes(row["mac"]) == conf.mac and (conf.seq >= newest or backfill):
                return Recorded(int(row["id"]), duplicate=True)  # the newest record, recorded already
            if row and bytes(row["mac"]) == conf.mac:
                raise StaleRecord(f"{conf.device_id}: confirmation record #{conf.seq} was recorded before, and "
                                  f"#{newest} since: a replayed record")
            if row:  # the same number with another MAC: not this device's record
                raise StaleRecord(f"{conf.device_id}: a different confirmation record #{conf.seq} is recorded already")
            if conf.seq <= newest and not backfill:
                raise StaleRecord(f"{conf.device_id}: confirmation record #{conf.seq} is not newer than #{newest}, "
                                  "the last one recorded: a replayed or stale record")
            self.db.execute("UPDATE devices SET last_seq=? WHERE id=? AND last_seq<?",
                            (conf.seq, conf.device_id, conf.seq))
        got = self.db.execute(
            "INSERT INTO upgrades(device, address, from_version, to_version, image_hash, result, reason, "
            "attempts, started, finished, record, mac, verified, campaign, seq, ref) "
            "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
            (o.device, o.address, o.from_version, o.to_version, o.image_hash, o.result, o.reason, o.attempts,
             o.started, o.finished, conf.raw if conf else None, conf.mac if conf else None, int(conf is not None),
             o.campaign, conf.seq if conf else None, ref)).one()
        rid = int(got["id"]) if got else 0
        if self.outbox_enabled and (publish if publish is not None else o.campaign is None):
            from .events import record_outcome

            self.outbox_put([record_outcome(o, rid)])
        return Recorded(rid)

    def add(self, o: Outcome, conf: Confirmation | None = None, ref: str | None = None, *,
            publish: bool | None = None) -> int:
        return self.record(o, conf, ref, publish=publish).id

    # -- the spool: outcomes the database could not take --------------------------
    def import_spool(self, path: Path, key: bytes | None = None,
                     on_field: Callable[[Outcome, Confirmation | None, Recorded], None] | None = None
                     ) -> tuple[int, list[str]]:
        """Record what a spool file holds, re-verifying each record with the
        device's registered key (or `key`). Lines taken (or found recorded
        already) leave the file; the others stay, each with why. Returns
        (lines taken, problems)."""
        from .confirm import verify
        from .errors import ConfirmationError

        try:
            lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise MeterotaError(f"cannot read spool {path}: {e.strerror}") from None
        kept: list[str] = []
        problems: list[str] = []
        taken = 0
        for n, ln in enumerate(lines, 1):
            try:
                doc = json.loads(ln)
                d = dict(doc["outcome"])
                for k in ("record", "mac"):
                    d[k] = bytes.fromhex(d[k]) if d.get(k) else None
                o = Outcome(**d)
            except (ValueError, KeyError, TypeError) as e:
                problems.append(f"{path}:{n}: not a spooled outcome ({e})")
                kept.append(ln)
                continue
            conf = None
            try:
                if o.record is not None:
                    dkey = key or self.key(o.device)
                    if dkey is None:
                        raise ConfirmationError(f"no HMAC key known for device {o.device}: pass --key")
                    conf = verify(o.record, o.mac or b"", dkey, device_id=o.device,
                                  image_hash=bytes.fromhex(o.image_hash))
                got = self.record(o, conf, doc.get("ref"), backfill=True)
            except NotRecorded as e:
                Path(path).write_text("\n".join(kept + lines[n - 1:]) + "\n")
                raise NotRecorded(f"{path}: the database is still not writable ({e}); the spool is kept") from None
            except ConfirmationError as e:
                problems.append(f"{path}:{n}: {e}")
                kept.append(ln)
                continue
            if on_field is not None and doc.get("field"):
                on_field(o, conf, got)
            taken += 1
        if kept:
            Path(path).write_text("\n".join(kept) + "\n")
        else:
            Path(path).unlink()
        return taken, problems

    def spool_path(self) -> Path:
        """Beside the SQLite file; for a server, in the user's meterota folder."""
        if self.dialect == "sqlite":
            p = Path(self.path)
            return p.with_name(p.name + ".spool")
        return Path(dbm.default_path()).with_name("unrecorded.spool")

    def spool(self, o: Outcome, ref: str | None, extra: dict[str, Any] | None = None) -> Path:
        d = asdict(o)
        for k in ("record", "mac"):
            d[k] = d[k].hex() if d[k] is not None else None
        line = json.dumps({"outcome": d, "ref": ref, **(extra or {})}, sort_keys=True) + "\n"
        for p in (self.spool_path(), Path(dbm.default_path()).with_name("unrecorded.spool")):
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                with open(p, "a") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
                return p
            except OSError:
                continue
        raise MeterotaError(f"{o.device}: {o.result} NOT RECORDED and no spool file writable; the outcome: "
                            f"{line.strip()}")

    def outcomes(self, device: str | None = None, limit: int = 100) -> Iterator[dict[str, Any]]:
        q = "SELECT * FROM upgrades" + (" WHERE device=?" if device else "") + " ORDER BY id DESC LIMIT ?"
        args: tuple[Any, ...] = (device, limit) if device else (limit,)
        for d in self.db.rows(q, args):
            for k in ("record", "mac"):
                if d[k] is not None:
                    d[k] = bytes(d[k]).hex()
            yield d

    # -- the event outbox ------------------------------------------------------
    def enable_outbox(self) -> None:
        self.outbox_enabled = True

    @atomic
    def outbox_put(self, messages: "list[Message]") -> None:
        """Queue messages in the caller's transaction (or one of their own). The
        publisher is woken at once: it reads behind the lock, so after the commit."""
        now = time.time()
        for m in messages:
            self.db.execute("INSERT INTO outbox(msg_id, topic, kind, retain, payload, created) VALUES(?,?,?,?,?,?)",
                            (m.msg_id, m.topic, m.kind, int(m.retain), m.payload, now))
        self.outbox_changed.set()

    @reading
    def outbox_unsent(self, limit: int = 100) -> list[dict[str, Any]]:
        return self.db.execute("SELECT id, msg_id, topic, kind, retain, payload FROM outbox WHERE sent IS NULL "
                               "ORDER BY id LIMIT ?", (limit,)).rows

    @atomic
    def outbox_mark_sent(self, ids: list[int]) -> None:
        if ids:
            self.db.execute(f"UPDATE outbox SET sent=? WHERE id IN ({','.join('?' * len(ids))})",
                            (time.time(), *ids))

    @atomic
    def outbox_claim(self, owner: str, ttl: float, dead: str | None = None) -> str | None:
        """Take or renew the drain lease; None when `owner` holds it now, else its holder.
        `dead`: a holder known to be gone, whose lease is taken over at once."""
        n = self.db.execute("UPDATE outbox_drain SET owner=?, expires={NOW} + ? WHERE id=1 AND (owner IS NULL "
                            "OR owner=? OR owner=? OR expires < {NOW})", (owner, float(ttl), owner, dead or owner)
                            ).rowcount
        if n:
            return None
        row = self.db.execute("SELECT owner FROM outbox_drain WHERE id=1").one()
        return str(row["owner"]) if row else "?"

    @atomic
    def outbox_release(self, owner: str) -> None:
        self.db.execute("UPDATE outbox_drain SET owner=NULL, expires=NULL WHERE id=1 AND owner=?", (owner,))

    @reading
    def outbox_counts(self) -> dict[str, int]:
        r = self.db.execute("SELECT COUNT(*) AS n, COUNT(sent) AS s FROM outbox").one() or {"n": 0, "s": 0}
        return {"sent": int(r["s"]), "unsent": int(r["n"]) - int(r["s"])}
