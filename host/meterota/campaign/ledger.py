"""The campaign ledger: campaigns, one row per target device with its current
outcome, the concentrator jobs a campaign started, a timeline of events, and
field work orders, and the campaign's units of work with their leases. It
lives in the same database as the upgrade records (store.py: a SQLite file or
a PostgreSQL server, one interface, db.py) and is written as things happen,
so a killed host can resume and any number of workers can share a campaign.

Row dictionaries returned here are the contract for export.py and report.py:
timestamps are epoch seconds (float), hashes are hex, record/mac are bytes.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from ..db import atomic
from ..errors import CampaignBusy
from ..store import Store


class LeaseLost(CampaignBusy):
    """This worker no longer holds the unit's lease (another took it over): it stops, writing nothing more."""

# Migrations: index i takes the ledger schema from version i to i + 1 (db.migrate).
MIGRATIONS = ["""
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
    heartbeat REAL
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
""", """
CREATE TABLE IF NOT EXISTS campaign_units (
    campaign TEXT NOT NULL,
    unit TEXT NOT NULL,            -- direct: the device's address; concentrator: its address
    grp TEXT NOT NULL,
    phase INTEGER NOT NULL,        -- index of its group: taken only while the campaign is in that phase
    kind TEXT NOT NULL,            -- direct | concentrator
    ord INTEGER NOT NULL DEFAULT 0,         -- its place in the plan: units are taken in plan order
    state TEXT NOT NULL DEFAULT 'pending',  -- pending | leased | done
    owner TEXT,                    -- the worker holding the lease: host:pid:nonce
    expires REAL,                  -- lease end, on the database's clock
    leases INTEGER NOT NULL DEFAULT 0,      -- how many times it was taken (a takeover is > 1)
    PRIMARY KEY (campaign, unit)
);
CREATE INDEX IF NOT EXISTS campaign_units_state ON campaign_units(campaign, phase, state);
"""]
SCHEMA_VERSION = len(MIGRATIONS)

FINAL = ("OK", "KO", "UNREACHABLE", "ERROR", "CANCELLED")
FAILED = ("KO", "UNREACHABLE", "ERROR")
CLASS_COLUMN = {"UNREACHABLE": "fails_unreachable", "KO": "fails_ko", "ERROR": "fails_error"}


class Ledger:
    """Campaign tables over a Store's database (SQLite or PostgreSQL). Safe to
    share between the runner's threads: each method is one transaction (or joins
    the caller's `store.transaction()`), retried whole after a lost server."""

    def __init__(self, store: Store):
        self.store = store
        self.db = store.db
        self.lock = store.lock
        self.db.migrate("ledger", MIGRATIONS)

    def transaction(self) -> Any:
        return self.db.transaction()

    def _write(self, sql: str, args: Iterable[Any] = ()) -> int:
        return self.db.run(lambda: self.db.execute(sql, tuple(args)).rowcount)

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        return self.db.rows(sql, tuple(args))

    # -- campaigns ---------------------------------------------------------
    def create_campaign(self, cid: str, name: str, plan: dict[str, Any], plan_file: str | None, image_hash: str,
                        version: str) -> None:
        if not self._write("INSERT INTO campaigns(id, name, plan, plan_file, image_hash, version, state, created) "
                           "VALUES(?,?,?,?,?,?,'running',?) ON CONFLICT(id) DO NOTHING",
                           (cid, name, json.dumps(plan, sort_keys=True), plan_file, image_hash, version, time.time())):
            raise CampaignBusy(f"campaign {cid} was just created by another process")

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

    def running(self) -> list[str]:
        """Campaigns a worker may take work of, oldest first."""
        return [r["id"] for r in self._rows("SELECT id FROM campaigns WHERE state='running' ORDER BY created, id")]

    def unfinished(self) -> list[str]:
        """Campaigns not finished yet: running, or stopped (aborted/halted/expired) but not wound up."""
        return [r["id"] for r in self._rows("SELECT id FROM campaigns WHERE finished IS NULL ORDER BY created, id")]

    def set_campaign(self, cid: str, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)

        def go() -> None:
            self.db.execute(f"UPDATE campaigns SET {cols} WHERE id=?", (*fields.values(), cid))
            if "state" in fields:
                self._publish(cid)
        self.db.run(go)

    @atomic
    def stop_campaign(self, cid: str, state: str, reason: str) -> bool:
        """End a running campaign campaign-wide (aborted | halted | expired): the
        first worker's reason wins; False when it was no longer running."""
        n = self.db.execute("UPDATE campaigns SET state=?, reason=? WHERE id=? AND state='running'",
                            (state, reason, cid)).rowcount
        if n:
            self.event(cid, "abort" if state == "aborted" else state, reason=reason)
            self._publish(cid)
        return n > 0

    # -- units and leases ------------------------------------------------------
    def add_unit(self, cid: str, unit: str, grp: str, phase: int, kind: str, ord: int = 0) -> None:
        self._write("INSERT INTO campaign_units(campaign, unit, grp, phase, kind, ord) VALUES(?,?,?,?,?,?) "
                    "ON CONFLICT(campaign, unit) DO NOTHING", (cid, unit, grp, phase, kind, ord))

    def units(self, cid: str) -> list[dict[str, Any]]:
        return self._rows("SELECT *, ({NOW}) AS now FROM campaign_units WHERE campaign=? ORDER BY phase, ord, unit",
                          (cid,))

    @atomic
    def claim_unit(self, owner: str, ttl: float, campaigns: list[str] | None = None,
                   expired_too: bool = True) -> dict[str, Any] | None:
        """Lease one unit of a running campaign in its current phase: a pending
        one, or (expired_too) one whose lease ran out. PostgreSQL: the row is
        locked FOR UPDATE SKIP LOCKED, so workers never wait on each other and
        never take the same unit; SQLite: the write transaction serialises."""
        q = ("SELECT u.campaign, u.unit, u.grp, u.phase, u.kind, u.owner, u.leases FROM campaign_units u "
             "JOIN campaigns c ON c.id=u.campaign WHERE c.state='running' AND u.phase=c.phase AND "
             + ("(u.state='pending' OR (u.state='leased' AND u.expires < {NOW}))" if expired_too
                else "u.state='pending'"))
        args: list[Any] = []
        if campaigns is not None:
            if not campaigns:
                return None
            q += " AND u.campaign IN (" + ",".join("?" * len(campaigns)) + ")"
            args += campaigns
        q += " ORDER BY c.created, u.campaign, u.ord, u.unit LIMIT 1"
        if self.db.dialect == "postgresql":
            q += " FOR UPDATE OF u SKIP LOCKED"
        row = self.db.execute(q, args).one()
        if row is None:
            return None
        self.db.execute("UPDATE campaign_units SET state='leased', owner=?, expires={NOW} + ?, leases=leases+1 "
                        "WHERE campaign=? AND unit=?", (owner, ttl, row["campaign"], row["unit"]))
        row["previous_owner"] = row.pop("owner")
        row["leases"] = int(row["leases"]) + 1
        return row

    @atomic
    def renew_leases(self, owner: str, ttl: float) -> set[tuple[str, str]]:
        """Extend every lease `owner` still holds; returns those (campaign, unit)."""
        rows = self.db.execute("UPDATE campaign_units SET expires={NOW} + ? WHERE owner=? AND state='leased' "
                               "RETURNING campaign, unit", (ttl, owner)).rows
        return {(r["campaign"], r["unit"]) for r in rows}

    @atomic
    def release_unit(self, cid: str, unit: str, owner: str, done: bool) -> bool:
        """Give a unit back (done, or pending for another worker); only its owner can."""
        return self.db.execute(
            "UPDATE campaign_units SET state=?, owner=CASE WHEN ?='done' THEN owner ELSE NULL END, expires=NULL "
            "WHERE campaign=? AND unit=? AND owner=? AND state='leased'",
            ("done" if done else "pending", "done" if done else "pending", cid, unit, owner)).rowcount > 0

    @atomic
    def release_owner(self, owner: str) -> int:
        """Free every lease of a worker known to be gone (same host, dead process). The owner
        stays on the pending row, so the worker that takes it next records a takeover from it."""
        return self.db.execute("UPDATE campaign_units SET state='pending', expires=NULL "
                               "WHERE owner=? AND state='leased'", (owner,)).rowcount

    def lease_owners(self, prefix: str) -> list[str]:
        return [r["owner"] for r in self._rows("SELECT DISTINCT owner FROM campaign_units WHERE state='leased' "
                                               "AND owner LIKE ?", (prefix + "%",))]

    def live_leases(self, cid: str) -> list[dict[str, Any]]:
        return self._rows("SELECT unit, owner, expires FROM campaign_units WHERE campaign=? AND state='leased' "
                          "AND expires >= {NOW}", (cid,))

    def lock_campaign(self, cid: str) -> dict[str, Any] | None:
        """Within a transaction: the campaign row, locked until the end of it (one
        worker at a time moves a campaign to its next phase or winds it up)."""
        assert self.db.in_transaction()
        if self.db.dialect == "postgresql":
            return self.db.execute("SELECT * FROM campaigns WHERE id=? FOR UPDATE", (cid,)).one()
        return self.db.execute("SELECT * FROM campaigns WHERE id=?", (cid,)).one()

    # -- devices -------------------------------------------------------------
    def add_target(self, cid: str, target: str, grp: str, kind: str, *, device: str | None = None,
                   via: str | None = None, address: str | None = None, image_hash: str, version: str) -> bool:
        """Add a target once; False when it was already there (a resumed plan)."""
        return self._write(
            "INSERT INTO campaign_devices(campaign, target, device, grp, kind, via, address, state, "
            "to_version, image_hash) VALUES(?,?,?,?,?,?,?,'pending',?,?) ON CONFLICT(campaign, target) DO NOTHING",
            (cid, target, device, grp, kind, via, address, version, image_hash)) > 0

    @atomic
    def claim_device(self, cid: str, target: str, device: str) -> str | None:
        """Note that `target` answers as `device`, unless another target of the
        campaign is that device already: then return that target (one device
        named two ways, or two addresses of one device: never flashed twice)."""
        row = self.db.execute("SELECT target FROM campaign_devices WHERE campaign=? AND device=? AND target<>?",
                              (cid, device, target)).one()
        if row is not None:
            return str(row["target"])
        self.db.execute("UPDATE campaign_devices SET device=? WHERE campaign=? AND target=?", (device, cid, target))
        return None

    @atomic
    def holds(self, cid: str, unit: str, owner: str) -> bool:
        """Whether `owner` still holds the unit's lease (the fence before acting on a device)."""
        return self.db.execute("SELECT 1 AS x FROM campaign_units WHERE campaign=? AND unit=? AND owner=? AND "
                               "state='leased'", (cid, unit, owner)).one() is not None

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

    @atomic
    def start_attempt(self, cid: str, target: str, grp: str, via: str | None = None) -> None:
        now = time.time()
        self.db.execute("UPDATE campaign_devices SET state='running', attempts=attempts+1, last_attempt=?, "
                        "first_attempt=COALESCE(first_attempt, ?) WHERE campaign=? AND target=?",
                        (now, now, cid, target))
        self.event(cid, "start", target=target, grp=grp, via=via)

    def update_device(self, cid: str, target: str, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self._write(f"UPDATE campaign_devices SET {cols} WHERE campaign=? AND target=?",
                    (*fields.values(), cid, target))

    @atomic
    def finish_device(self, cid: str, target: str, result: str, reason: str, *, final: bool,
                      device: str | None = None, from_version: str | None = None, record: bytes | None = None,
                      mac: bytes | None = None, verified: bool = False, last_seen: float | None = None,
                      attempts: int | None = None, source: str = "campaign", count: bool = True,
                      t: float | None = None, kind: str | None = None) -> None:
        """Record one attempt's outcome. A failure that will be retried goes back
        to pending (final=False) with its class counter raised (unless count is
        False: the device was not actually tried). One transaction with its
        timeline event and, while publishing, its outbox messages."""
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
        if count or final:  # a meter the job never tried is no outcome
            self._publish(cid, target=target, result=result, final=final, t=now)

    # -- the event stream (events.py): messages in the transaction of what they tell ---------
    def _head(self, cid: str) -> dict[str, Any]:
        return self._rows("SELECT id, name, state, reason, version, image_hash, created FROM campaigns WHERE id=?",
                          (cid,))[0]

    def _publish(self, cid: str, *, target: str | None = None, result: str = "", final: bool = True,
                 t: float | None = None, workorders: Iterable[tuple[dict[str, Any], str]] = ()) -> None:
        """Outbox messages for a device outcome (target), work orders opened/closed, and the
        campaign's progress after them; nothing when no publisher is configured."""
        if not self.store.outbox_enabled:
            return
        from .. import events

        c = self._head(cid)
        msgs = []
        if target is not None:
            row = self.device_row(cid, target)
            assert row is not None
            msgs.append(events.campaign_outcome(c, row, final=final, result=result, t=t or time.time()))
        msgs += [events.workorder(w, state) for w, state in workorders]
        msgs.append(events.progress(c, self.counts(cid).get("", {})))
        self.store.outbox_put(msgs)

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
                    "job=COALESCE(excluded.job, campaign_jobs.job), state=excluded.state",
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
        def go() -> bool:
            device = row["device"] or row["target"]
            opened = self.db.execute(
                "INSERT INTO workorders(campaign, device, concentrator, address, image_hash, version, "
                "result, reason, last_seen, created, state) VALUES(?,?,?,?,?,?,?,?,?,?,'open') "
                "ON CONFLICT(campaign, device) DO NOTHING",
                (cid, device, row["via"], row["address"], row["image_hash"], version,
                 row["state"], row["reason"], row["last_seen"], time.time())).rowcount > 0
            if opened and self.store.outbox_enabled:
                w = self.db.execute("SELECT * FROM workorders WHERE campaign=? AND device=?", (cid, device)).one()
                assert w is not None
                self._publish(cid, workorders=[(w, "open")])
            return opened
        return self.db.run(go)

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

    @atomic
    def close_workorders(self, device: str, image_hash: str, upgrade_id: int | None) -> list[dict[str, Any]]:
        """A verified field upgrade of `device` to `image_hash` closes its open work orders."""
        rows = self._rows("SELECT * FROM workorders WHERE device=? AND image_hash=? AND state='open'",
                          (device, image_hash))
        now = time.time()
        for w in rows:
            self._write("UPDATE workorders SET state='closed', closed=?, closed_by=? WHERE id=?",
                        (now, upgrade_id, w["id"]))
            self._publish(w["campaign"], workorders=[(dict(w, state="closed", closed=now, closed_by=upgrade_id),
                                                      "closed")])
        return rows
