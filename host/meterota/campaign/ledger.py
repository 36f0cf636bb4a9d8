"""The campaign ledger: campaigns, one row per target device with its current
outcome, the concentrator jobs a campaign started, a timeline of events, and
field work orders. It lives in the same SQLite file as the upgrade records
(store.py) and is written as things happen, so a killed host can resume.

Row dictionaries returned here are the contract for export.py and report.py:
timestamps are epoch seconds (float), hashes are hex, record/mac are bytes.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import uuid
from typing import Any, Iterable

from ..errors import CampaignBusy
from ..store import Store

# This process as a campaign owner: host, pid and a token (a pid is reused).
OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease_seconds() -> float:
    """How long a campaign's owner holds it without renewing (renewed every
    0.5 s while it runs); METEROTA_LEASE_S overrides the default 15 s."""
    try:
        return max(1.0, float(os.environ.get("METEROTA_LEASE_S", "15")))
    except ValueError:
        return 15.0


def _dead_owner(c: dict[str, Any]) -> str | None:
    """The campaign's owner when it is a process of this host that is gone."""
    owner = str(c.get("owner") or "")
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return owner
    except PermissionError:
        return None
    return None


class LeaseLost(CampaignBusy):
    """This process no longer owns the campaign: another took it over."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS campaigns (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    plan TEXT NOT NULL,            -- the plan as JSON (resolved paths), for resume
    plan_file TEXT,
    image_hash TEXT NOT NULL,
    version TEXT NOT NULL,
    state TEXT NOT NULL,           -- running | done | aborted | expired
    reason TEXT,
    phase INTEGER NOT NULL DEFAULT 0,  -- index of the group being rolled out
    created REAL NOT NULL,
    finished REAL,
    pid INTEGER,
    heartbeat REAL,
    owner TEXT,                    -- the process running it (host:pid:token), while its lease lasts
    lease_expires REAL             -- epoch seconds; after it, another process may take the campaign over
);
CREATE TABLE IF NOT EXISTS campaign_devices (
    campaign TEXT NOT NULL,
    target TEXT NOT NULL,          -- direct: its address; meter: its id
    device TEXT,                   -- device id once known (a meter's id from the start)
    grp TEXT NOT NULL,
    kind TEXT NOT NULL,            -- direct | meter
    via TEXT,                      -- meter: the concentrator's id
    address TEXT,                  -- direct: port/udp address; meter: concentrator address
    state TEXT NOT NULL,           -- pending | running | OK | KO | UNREACHABLE | ERROR | CANCELLED
    from_version TEXT,
    to_version TEXT,
    image_hash TEXT,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    fails_unreachable INTEGER NOT NULL DEFAULT 0,
    fails_ko INTEGER NOT NULL DEFAULT 0,
    fails_error INTEGER NOT NULL DEFAULT 0,
    first_attempt REAL,
    last_attempt REAL,
    finished REAL,
    last_seen REAL,
    record BLOB,
    mac BLOB,
    verified INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL DEFAULT 'campaign',  -- campaign | field
    PRIMARY KEY (campaign, target)
);
CREATE INDEX IF NOT EXISTS campaign_devices_device ON campaign_devices(device);
CREATE TABLE IF NOT EXISTS campaign_jobs (
    campaign TEXT NOT NULL,
    concentrator TEXT NOT NULL,    -- the concentrator's address
    round INTEGER NOT NULL,        -- 0 first job, 1.. retry jobs
    job INTEGER,                   -- the concentrator's job id, once created
    state TEXT NOT NULL,           -- creating | running | collected | cancelled
    seen INTEGER NOT NULL DEFAULT 0,  -- results already taken into the ledger
    created REAL NOT NULL,
    PRIMARY KEY (campaign, concentrator, round)
);
CREATE TABLE IF NOT EXISTS campaign_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    campaign TEXT NOT NULL,
    t REAL NOT NULL,
    target TEXT,
    grp TEXT,
    via TEXT,
    kind TEXT NOT NULL,            -- created | phase | start | result | retry | field | abort | halted
                                   -- | expired | workorders | end
    result TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS campaign_events_c ON campaign_events(campaign, t);
CREATE TABLE IF NOT EXISTS workorders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    campaign TEXT NOT NULL,
    device TEXT NOT NULL,
    concentrator TEXT,
    address TEXT,
    image_hash TEXT NOT NULL,
    version TEXT NOT NULL,
    result TEXT NOT NULL,          -- KO | UNREACHABLE | ERROR: why the visit is needed
    reason TEXT,
    last_seen REAL,
    created REAL NOT NULL,
    state TEXT NOT NULL,           -- open | closed
    closed REAL,
    closed_by INTEGER,             -- upgrades.id of the field upgrade that closed it
    UNIQUE (campaign, device)
);
"""

FINAL = ("OK", "KO", "UNREACHABLE", "ERROR", "CANCELLED")
FAILED = ("KO", "UNREACHABLE", "ERROR")
CLASS_COLUMN = {"UNREACHABLE": "fails_unreachable", "KO": "fails_ko", "ERROR": "fails_error"}


class Ledger:
    """Campaign tables over a Store's SQLite connection. Safe to share between
    the runner's worker threads: every write takes the store's lock and one
    transaction."""

    def __init__(self, store: Store):
        self.store = store
        self.db = store.db
        self.lock = store.lock
        self.guarded: str | None = None  # a campaign this process owns: every write checks the lease first
        store._retrying(self._init_schema)

    def _init_schema(self) -> None:
        with self.lock, self.db:
            self.db.executescript(SCHEMA)
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(campaigns)")}
            for col in ("owner TEXT", "lease_expires REAL"):
                if col.split()[0] not in cols:
                    self.db.execute(f"ALTER TABLE campaigns ADD COLUMN {col}")

    def _tx(self, fn: Any) -> Any:
        """fn(cursor) in one write transaction; with a guarded campaign, only
        while this process still owns it (checked inside the transaction, so
        a process that lost its lease cannot write after the check)."""
        def once() -> Any:
            with self.lock:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    if self.guarded is not None:
                        row = self.db.execute("SELECT owner FROM campaigns WHERE id=?", (self.guarded,)).fetchone()
                        if row is not None and row["owner"] != OWNER:
                            raise LeaseLost(f"campaign {self.guarded} was taken over by {row['owner'] or 'nobody'}: "
                                            "this process stops")
                    out = fn()
                except BaseException:
                    self.db.rollback()
                    raise
                self.db.commit()
                return out
        return self.store._retrying(once)

    def _write(self, sql: str, args: Iterable[Any] = ()) -> int:
        return int(self._tx(lambda: self.db.execute(sql, tuple(args)).lastrowid or 0))

    # -- ownership: a lease (owner, expiry) taken and renewed atomically ---------
    def acquire(self, cid: str, ttl: float | None = None) -> None:
        """Take the campaign for this process, or raise CampaignBusy naming its
        owner. Free when nobody owns it, its lease expired, or it is ours."""
        now = time.time()
        ttl = lease_seconds() if ttl is None else ttl

        def take() -> int:
            return self.db.execute(
                "UPDATE campaigns SET owner=?, lease_expires=?, pid=?, heartbeat=? WHERE id=? AND "
                "(owner IS NULL OR owner=? OR lease_expires IS NULL OR lease_expires < ?)",
                (OWNER, now + ttl, os.getpid(), now, cid, OWNER, now)).rowcount
        guarded, self.guarded = self.guarded, None
        try:
            got = self._tx(take)
            if not got:
                dead = _dead_owner(self.campaign(cid) or {})
                if dead is not None:  # its process is gone (killed): take over without waiting out its lease
                    got = self._tx(lambda: self.db.execute(
                        "UPDATE campaigns SET owner=?, lease_expires=?, pid=?, heartbeat=? WHERE id=? AND owner=?",
                        (OWNER, now + ttl, os.getpid(), now, cid, dead)).rowcount)
        finally:
            self.guarded = guarded
        if not got:
            c = self.campaign(cid) or {}
            raise CampaignBusy(f"campaign {cid} is being run by {c.get('owner')} (its lease holds until "
                               f"{time.strftime('%H:%M:%S', time.localtime(float(c.get('lease_expires') or 0)))}): "
                               f"wait for it to end, or stop it with `meterota campaign abort {cid}`")
        self.guarded = cid

    def renew(self, cid: str, ttl: float | None = None) -> float:
        """Extend our lease; returns its new expiry. LeaseLost when it is not ours any more."""
        until = time.time() + (lease_seconds() if ttl is None else ttl)

        def extend() -> int:
            return self.db.execute("UPDATE campaigns SET lease_expires=?, heartbeat=?, pid=? WHERE id=? AND owner=?",
                                   (until, time.time(), os.getpid(), cid, OWNER)).rowcount
        if not self._tx(extend):
            raise LeaseLost(f"campaign {cid} was taken over by another process: this process stops")
        return until

    def release(self, cid: str) -> None:
        try:
            self._tx(lambda: self.db.execute("UPDATE campaigns SET owner=NULL, lease_expires=NULL WHERE id=? AND "
                                             "owner=?", (cid, OWNER)))
        except (LeaseLost, sqlite3.Error):
            pass
        if self.guarded == cid:
            self.guarded = None

    def owned_elsewhere(self, cid: str) -> bool:
        """Whether another process holds a live lease on the campaign."""
        c = self.campaign(cid) or {}
        return bool(c.get("owner")) and c.get("owner") != OWNER and float(c.get("lease_expires") or 0) > time.time() \
            and _dead_owner(c) is None

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.db.execute(sql, tuple(args))]

    # -- campaigns ---------------------------------------------------------
    def create_campaign(self, cid: str, name: str, plan: dict[str, Any], plan_file: str | None, image_hash: str,
                        version: str) -> None:
        """Create it owned by this process (so nobody can resume it before we run it)."""
        now = time.time()
        try:
            self._write("INSERT INTO campaigns(id, name, plan, plan_file, image_hash, version, state, created, owner, "
                        "lease_expires, pid, heartbeat) VALUES(?,?,?,?,?,?,'running',?,?,?,?,?)",
                        (cid, name, json.dumps(plan, sort_keys=True), plan_file, image_hash, version, now, OWNER,
                         now + lease_seconds(), os.getpid(), now))
        except sqlite3.IntegrityError:
            raise CampaignBusy(f"campaign {cid} was just created by another process") from None

    def campaign(self, cid: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM campaigns WHERE id=?", (cid,))
        if not rows:
            return None
        c = rows[0]
        c["plan"] = json.loads(c["plan"])
        return c

    def campaigns(self) -> list[dict[str, Any]]:
        return self._rows("SELECT c.id, c.name, c.state, c.version, c.created, c.finished, c.reason, "
                          "(SELECT COUNT(*) FROM campaign_devices d WHERE d.campaign=c.id) AS total, "
                          "(SELECT COUNT(*) FROM campaign_devices d WHERE d.campaign=c.id AND d.state='OK') AS ok "
                          "FROM campaigns c ORDER BY c.created DESC")

    def set_campaign(self, cid: str, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self._write(f"UPDATE campaigns SET {cols} WHERE id=?", (*fields.values(), cid))

    # -- devices -------------------------------------------------------------
    def add_target(self, cid: str, target: str, grp: str, kind: str, *, device: str | None = None,
                   via: str | None = None, address: str | None = None, image_hash: str, version: str) -> bool:
        """Add a target once; False when it was already there (a resumed plan)."""
        return bool(self._tx(lambda: self.db.execute(
            "INSERT OR IGNORE INTO campaign_devices(campaign, target, device, grp, kind, via, address, state, "
            "to_version, image_hash) VALUES(?,?,?,?,?,?,?,'pending',?,?)",
            (cid, target, device, grp, kind, via, address, version, image_hash)).rowcount > 0))

    def claim_device(self, cid: str, target: str, device: str) -> str | None:
        """Note that `target` answers as `device`, unless another target of the
        campaign is that device already: then return that target (one device
        named two ways, or two addresses of one device: never flashed twice)."""
        def claim() -> str | None:
            row = self.db.execute("SELECT target FROM campaign_devices WHERE campaign=? AND device=? AND target<>?",
                                  (cid, device, target)).fetchone()
            if row is not None:
                return str(row["target"])
            self.db.execute("UPDATE campaign_devices SET device=? WHERE campaign=? AND target=?", (device, cid, target))
            return None
        return self._tx(claim)  # type: ignore[no-any-return]

    def devices(self, cid: str, grp: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM campaign_devices WHERE campaign=?"
        args: list[Any] = [cid]
        if grp is not None:
            q += " AND grp=?"
            args.append(grp)
        if state is not None:
            q += " AND state=?"
            args.append(state)
        return self._rows(q + " ORDER BY grp, target", args)

    def device_row(self, cid: str, target: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM campaign_devices WHERE campaign=? AND target=?", (cid, target))
        return rows[0] if rows else None

    def devices_via(self, cid: str, address: str) -> list[dict[str, Any]]:
        """The meters a campaign reaches through the concentrator at `address`."""
        return self._rows("SELECT * FROM campaign_devices WHERE campaign=? AND kind='meter' AND address=? "
                          "ORDER BY target", (cid, address))

    def rows_for_device(self, device: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM campaign_devices WHERE device=?", (device,))

    def start_attempt(self, cid: str, target: str, grp: str, via: str | None = None) -> None:
        now = time.time()
        self._write("UPDATE campaign_devices SET state='running', attempts=attempts+1, last_attempt=?, "
                    "first_attempt=COALESCE(first_attempt, ?) WHERE campaign=? AND target=?",
                    (now, now, cid, target))
        self.event(cid, "start", target=target, grp=grp, via=via)

    def update_device(self, cid: str, target: str, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self._write(f"UPDATE campaign_devices SET {cols} WHERE campaign=? AND target=?",
                    (*fields.values(), cid, target))

    def finish_device(self, cid: str, target: str, result: str, reason: str, *, final: bool,
                      device: str | None = None, from_version: str | None = None, record: bytes | None = None,
                      mac: bytes | None = None, verified: bool = False, last_seen: float | None = None,
                      attempts: int | None = None, source: str = "campaign", count: bool = True,
                      t: float | None = None, kind: str | None = None) -> None:
        """Record one attempt's outcome. A failure that will be retried goes back
        to pending (final=False) with its class counter raised (unless count is
        False: the device was not actually tried)."""
        row = self.device_row(cid, target)
        assert row is not None, target
        now = t or time.time()
        fields: dict[str, Any] = {"reason": reason, "source": source}
        if count and result in CLASS_COLUMN:
            fields[CLASS_COLUMN[result]] = int(row[CLASS_COLUMN[result]]) + 1
        fields["state"] = result if final else "pending"
        if final:
            fields["finished"] = now
        if device is not None:
            fields["device"] = device
        if from_version is not None:
            fields["from_version"] = from_version
        if record is not None:
            fields.update(record=record, mac=mac, verified=int(verified))
        if last_seen is not None:
            fields["last_seen"] = last_seen
        if attempts is not None:
            fields["attempts"] = max(int(row["attempts"]), attempts)
        self.update_device(cid, target, **fields)
        self.event(cid, kind or ("result" if final else "retry"), target=target, grp=row["grp"], via=row["via"],
                   result=result, reason=reason, t=now)

    def counts(self, cid: str, by: str | None = None) -> dict[str, dict[str, int]]:
        """{key: {state: n}}; key is the group, the concentrator or '' for all."""
        col = {"grp": "grp", "via": "COALESCE(via, 'direct')", None: "''"}[by]
        out: dict[str, dict[str, int]] = {}
        for r in self._rows(f"SELECT {col} AS k, state, COUNT(*) AS n FROM campaign_devices WHERE campaign=? "
                            "GROUP BY k, state", (cid,)):
            out.setdefault(str(r["k"]), {})[str(r["state"])] = int(r["n"])
        return out

    # -- concentrator jobs ---------------------------------------------------
    def job(self, cid: str, concentrator: str, rnd: int) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM campaign_jobs WHERE campaign=? AND concentrator=? AND round=?",
                          (cid, concentrator, rnd))
        return rows[0] if rows else None

    def jobs(self, cid: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM campaign_jobs WHERE campaign=? ORDER BY concentrator, round", (cid,))

    def put_job(self, cid: str, concentrator: str, rnd: int, job: int | None, state: str) -> None:
        self._write("INSERT INTO campaign_jobs(campaign, concentrator, round, job, state, created) "
                    "VALUES(?,?,?,?,?,?) ON CONFLICT(campaign, concentrator, round) DO UPDATE SET "
                    "job=COALESCE(excluded.job, job), state=excluded.state",
                    (cid, concentrator, rnd, job, state, time.time()))

    def job_seen(self, cid: str, concentrator: str, rnd: int, seen: int) -> None:
        self._write("UPDATE campaign_jobs SET seen=? WHERE campaign=? AND concentrator=? AND round=?",
                    (seen, cid, concentrator, rnd))

    # -- events --------------------------------------------------------------
    def event(self, cid: str, kind: str, *, target: str | None = None, grp: str | None = None,
              via: str | None = None, result: str | None = None, reason: str | None = None,
              t: float | None = None) -> None:
        self._write("INSERT INTO campaign_events(campaign, t, target, grp, via, kind, result, reason) "
                    "VALUES(?,?,?,?,?,?,?,?)", (cid, t or time.time(), target, grp, via, kind, result, reason))

    def events(self, cid: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM campaign_events WHERE campaign=? ORDER BY t, id", (cid,))

    # -- work orders -----------------------------------------------------------
    def open_workorder(self, cid: str, row: dict[str, Any], version: str) -> bool:
        """A work order for a target that ended KO / UNREACHABLE / ERROR; once per campaign and device."""
        return bool(self._tx(lambda: self.db.execute(
            "INSERT OR IGNORE INTO workorders(campaign, device, concentrator, address, image_hash, version, "
            "result, reason, last_seen, created, state) VALUES(?,?,?,?,?,?,?,?,?,?,'open')",
            (cid, row["device"] or row["target"], row["via"], row["address"], row["image_hash"], version,
             row["state"], row["reason"], row["last_seen"], time.time())).rowcount > 0))

    def workorders(self, cid: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM workorders WHERE 1=1"
        args: list[Any] = []
        if cid:
            q += " AND campaign=?"
            args.append(cid)
        if state:
            q += " AND state=?"
            args.append(state)
        return self._rows(q + " ORDER BY campaign, device", args)

    def close_workorders(self, device: str, image_hash: str, upgrade_id: int | None) -> list[dict[str, Any]]:
        """A verified field upgrade of `device` to `image_hash` closes its open work orders."""
        with self.lock:
            rows = self._rows("SELECT * FROM workorders WHERE device=? AND image_hash=? AND state='open'",
                              (device, image_hash))
            for w in rows:
                self._write("UPDATE workorders SET state='closed', closed=?, closed_by=? WHERE id=?",
                            (time.time(), upgrade_id, w["id"]))
        return rows

