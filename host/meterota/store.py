"""The host's records: a SQLite file (the embedded default) holding every
upgrade outcome with its raw confirmation record, and the device key registry.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from .confirm import Confirmation, check_outcome
from .errors import MeterotaError, NotRecorded, StaleRecord

T = TypeVar("T")

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
    campaign TEXT,
    seq INTEGER,                   -- the verified record's sequence number
    ref TEXT                       -- a relayed result's identity: relay:CONCENTRATOR:JOB:METER:ATTEMPTS:T
);
CREATE INDEX IF NOT EXISTS upgrades_device ON upgrades(device);
"""
# After the columns exist (older files get them by ALTER TABLE first).
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
        self.wait = db_wait()
        # One connection shared by a campaign's worker threads, serialised here.
        self.db = sqlite3.connect(str(self.path), timeout=self.wait, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.lock = threading.RLock()
        self._retrying(self._init_schema)

    def _init_schema(self) -> None:
        with self.lock, self.db:
            if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(upgrades)")}
            for col in ("seq INTEGER", "ref TEXT"):
                if col.split()[0] not in cols:
                    self.db.execute(f"ALTER TABLE upgrades ADD COLUMN {col}")
            self.db.executescript(INDEXES)

    def _retrying(self, fn: Callable[[], T]) -> T:
        """Run a write, retrying while the database is locked (busy_timeout
        waits inside each try) until METEROTA_DB_WAIT seconds have passed."""
        deadline = time.monotonic() + self.wait
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)  # the lock holder is another process; back off briefly, bounded by the deadline

    def close(self) -> None:
        self.db.close()

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

    def newest_seq(self, device: str) -> int:
        """The newest record number known for `device`: its registry entry or
        its recorded records (a device upgraded with --key has no entry)."""
        with self.lock:
            row = self.db.execute(
                "SELECT MAX(COALESCE((SELECT last_seq FROM devices WHERE id=?), 0), "
                "COALESCE((SELECT MAX(seq) FROM upgrades WHERE device=?), 0))", (device, device)).fetchone()
        return int(row[0] or 0)

    # -- outcomes ------------------------------------------------------------
    def record(self, o: Outcome, conf: Confirmation | None = None, ref: str | None = None,
               spool_extra: dict[str, Any] | None = None, backfill: bool = False) -> Recorded:
        """Record an outcome: the only way into `upgrades` (see the module doc).
        Raises ConfirmationError (an OK without a verified OK record),
        StaleRecord (a replay), NotRecorded (database unwritable: spooled)."""
        check_outcome(o.result, conf, o.device, o.image_hash)
        o.record, o.mac, o.verified = (conf.raw, conf.mac, True) if conf else (None, None, False)
        try:
            return self._retrying(lambda: self._record(o, conf, ref, backfill))
        except StaleRecord:
            raise
        except sqlite3.Error as e:
            if backfill:  # importing a spool: it stays where it is
                raise NotRecorded(f"{self.path}: {e}") from None
            where = self.spool(o, ref, spool_extra)
            raise NotRecorded(f"{o.device}: {o.result} NOT RECORDED in {self.path}: {e}; saved to {where}: "
                              f"import it with `meterota --db {self.path} records import {where}`") from None

    def _record(self, o: Outcome, conf: Confirmation | None, ref: str | None, backfill: bool) -> Recorded:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")  # one writer from here to the commit: check and insert together
            try:
                got = self._record_in_tx(o, conf, ref, backfill)
            except BaseException:
                self.db.rollback()
                raise
            self.db.commit()
            return got

    def _record_in_tx(self, o: Outcome, conf: Confirmation | None, ref: str | None, backfill: bool) -> Recorded:
        if ref is not None:
            row = self.db.execute("SELECT id FROM upgrades WHERE ref=?", (ref,)).fetchone()
            if row:
                return Recorded(int(row["id"]), duplicate=True)
        if conf is not None:
            row = self.db.execute("SELECT id, mac FROM upgrades WHERE device=? AND seq=?",
                                  (conf.device_id, conf.seq)).fetchone()
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
            self.db.execute("UPDATE devices SET last_seq=MAX(last_seq, ?) WHERE id=?", (conf.seq, conf.device_id))
        cur = self.db.execute(
            "INSERT INTO upgrades(device, address, from_version, to_version, image_hash, result, reason, "
            "attempts, started, finished, record, mac, verified, campaign, seq, ref) "
            "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (o.device, o.address, o.from_version, o.to_version, o.image_hash, o.result, o.reason, o.attempts,
             o.started, o.finished, conf.raw if conf else None, conf.mac if conf else None, int(conf is not None),
             o.campaign, conf.seq if conf else None, ref))
        return Recorded(int(cur.lastrowid or 0))

    def add(self, o: Outcome, conf: Confirmation | None = None, ref: str | None = None) -> int:
        return self.record(o, conf, ref).id

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
        return self.path.with_name(self.path.name + ".spool")

    def spool(self, o: Outcome, ref: str | None, extra: dict[str, Any] | None = None) -> Path:
        d = asdict(o)
        for k in ("record", "mac"):
            d[k] = d[k].hex() if d[k] is not None else None
        line = json.dumps({"outcome": d, "ref": ref, **(extra or {})}, sort_keys=True) + "\n"
        for p in (self.spool_path(), default_path().with_name("unrecorded.spool")):
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
        with self.lock:
            rows = self.db.execute(q, args).fetchall()
        for row in rows:
            d = dict(row)
            for k in ("record", "mac"):
                if d[k] is not None:
                    d[k] = bytes(d[k]).hex()
            yield d
