"""Campaigns: one image rolled out over direct devices and concentrators' meters
in phased groups, with the plan's policy (plan.py), every outcome written to
the ledger (ledger.py) as it happens.

A campaign never upgrades a device twice. Direct devices: a device already on
the image is OK without an upload (and its standing confirmation record is
kept); an attempt cut by a killed host resumes its upload or its trial.
Concentrators: each job's id is in the ledger before we wait on it, so a
resumed host follows the same job instead of starting another; a job created
just before a kill is found again by its image hash. The concentrator itself
skips meters already on the image.

Phases: a group starts when the previous one ended with at least its
success_threshold OK (else the campaign is `halted`). The abort threshold is
checked after every result (`aborted`). Outside the time window nothing new
starts; after the campaign's duration, or when the window will not open again,
it ends `expired`. Devices never tried end CANCELLED; devices that failed
after their retries become work orders.

Workers: a campaign's units (a direct device; a concentrator with its meters)
are leased to workers (Worker: any number of processes on any number of hosts
over one ledger; `campaign run` and `resume` are one more). A lease has an
owner and an expiry on the database's clock, is taken with FOR UPDATE SKIP
LOCKED on PostgreSQL and renewed every third of its length; a dead worker's
units are taken over when their leases expire. The upgrade steps check the
lease before they act on a device (Runner.own), so a worker that was stopped
(SIGSTOP, a long database outage) past its lease and taken over stops instead
of carrying on. Phases, thresholds, aborts and the wind-up are decided
campaign-wide in the ledger, by whichever worker sees them first.

One device is flashed once: plan targets are compared by canonical address
(plan.py), and each direct device's answered id is claimed in the ledger
before anything is written to it (a second target answering the same id is
CANCELLED, not upgraded).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import image as img
from ..client import SMPClient
from ..concentrator import Concentrator, JobSpec, record_relayed
from ..errors import (CampaignBusy, ImageError, MeterotaError, NotRecorded, SilentAfterReset, TransportError, UpgradeKO,
                      EXIT_KO, EXIT_OK, EXIT_REFUSED, EXIT_STOPPED)
from .ledger import FAILED, FINAL, LeaseLost, Ledger
from .plan import ConcentratorTarget, Group, Plan, PlanError
from ..store import Outcome, Store
from ..transport import from_address
from ..upgrade import Upgrader

log = logging.getLogger("meterota.campaign")

POLL_S = 0.5  # concentrator job status and abort requests are polled at 2 Hz


@dataclass
class Summary:
    campaign: str
    state: str
    reason: str
    counts: dict[str, int]
    workorders: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.state != "done":
            return EXIT_STOPPED
        return EXIT_KO if any(self.counts.get(s) for s in FAILED) else EXIT_OK


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:32] or "campaign"


def read_image(path: str) -> tuple[bytes, img.ImageInfo]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read the plan's image {path}: {e.strerror}") from None
    return data, img.checked(data, path)


def create(ledger: Ledger, plan: Plan, plan_file: str | None, cid: str | None = None) -> str:
    """Register a campaign, its known targets and its units of work; returns its id."""
    _, info = read_image(plan.image)
    if cid is None:
        base = f"{_slug(plan.name)}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        cid, n = base, 1
        while ledger.campaign(cid) is not None:
            n += 1
            cid = f"{base}-{n}"
    elif (old := ledger.campaign(cid)) is not None:
        if old["finished"] is None:
            owners = sorted({str(u["owner"]) for u in ledger.live_leases(cid)})
            raise CampaignBusy(f"campaign {cid} exists already and is running"
                               + (f" (worked by {', '.join(owners)})" if owners else "")
                               + f": `meterota campaign resume {cid}` or `campaign worker` joins it")
        raise PlanError(f"campaign {cid} exists already: use `meterota campaign resume {cid}`")
    with ledger.transaction():
        ledger.create_campaign(cid, plan.name, plan.as_dict(), plan_file, info.hash.hex(), info.version_str)
        for g in plan.groups:
            for d in g.devices:
                ledger.add_target(cid, d, g.name, "direct", address=d, image_hash=info.hash.hex(),
                                  version=info.version_str)
            for ct in g.concentrators:
                for m in ct.meters or []:
                    ledger.add_target(cid, m, g.name, "meter", device=m, via=ct.address, address=ct.address,
                                      image_hash=info.hash.hex(), version=info.version_str)
        add_units(ledger, cid, plan)
        ledger.event(cid, "created", reason=f"{plan.name}: {info.version_str}")
        if plan.groups:
            ledger.event(cid, "phase", grp=plan.groups[0].name)
    return cid


def add_units(ledger: Ledger, cid: str, plan: Plan) -> None:
    """The campaign's units of work: one per direct device, one per concentrator
    (with all its meters). Idempotent: a campaign from before units existed gets them."""
    with ledger.transaction():
        n = 0
        for i, g in enumerate(plan.groups):
            for d in g.devices:
                ledger.add_unit(cid, d, g.name, i, "direct", n)
                n += 1
            for ct in g.concentrators:
                ledger.add_unit(cid, ct.address, g.name, i, "concentrator", n)
                n += 1


class Runner:
    """One campaign as a worker sees it: its plan, its image (checked against
    the campaign's hash: a worker with another image is refused), its policy
    (thresholds, windows, duration) applied campaign-wide through the ledger,
    and the work of one unit at a time per thread."""

    def __init__(self, store: Store, ledger: Ledger, cid: str, *, timeout: float = 3.0, retries: int = 3,
                 step: Callable[[str], None] | None = None, image: str | None = None):
        c = ledger.campaign(cid)
        if c is None:
            raise PlanError(f"no campaign {cid} in {store.path}")
        self.row = c
        self.store = store
        self.ledger = ledger
        self.cid = cid
        self.plan = Plan.from_dict(c["plan"])
        path = image or self.plan.image
        self.data, self.info = read_image(path)
        if self.info.hash.hex() != c["image_hash"]:
            raise ImageMismatch(f"refusing campaign {cid}: {path} is {self.info.version_str} "
                                f"{self.info.hash.hex()[:16]}…, the campaign was created with {c['version']} "
                                f"{c['image_hash'][:16]}… (every worker of a campaign must have its image)")
        self.hash = self.info.hash
        self.version = self.info.version_str
        self.timeout = timeout
        self.retries = retries
        self.step: Callable[[str], None] = step or (lambda s: log.info(s))
        self.deadline = float(c["created"]) + self.plan.duration
        self._stop = threading.Event()
        self._unit = threading.local()  # the lease of the unit this thread works
        self.end_state: str | None = None
        self.end_reason = ""
        self.interrupted = False  # Ctrl-C: stop without ending the campaign, so it can be resumed
        self.lost_lease: LeaseLost | None = None  # a unit of ours was taken over (we were stopped past its lease)
        add_units(ledger, cid, self.plan)

    # -- control ---------------------------------------------------------------
    def halt(self, state: str, reason: str) -> None:
        """Stop the campaign, campaign-wide: the first reason of any worker wins."""
        if self.ledger.stop_campaign(self.cid, state, reason):
            self.end_state, self.end_reason = state, reason
            self.step(f"campaign {state}: {reason}")
        self._stop.set()

    def stopping(self) -> bool:
        lost = getattr(self._unit, "lost", None)
        return self._stop.is_set() or (lost is not None and lost.is_set())

    def _lost(self) -> bool:
        lost = getattr(self._unit, "lost", None)
        return lost is not None and lost.is_set()

    def poll(self) -> None:
        """Called by the worker every POLL_S: an operator's `campaign abort`, another
        worker's halt (the ledger's state) and the campaign's duration."""
        c = self.ledger.campaign(self.cid)
        if c and c["state"] != "running":
            if not self._stop.is_set():
                self.step(f"campaign {c['state']}: {c['reason'] or ''}")
            self._stop.set()
        elif time.time() >= self.deadline:
            self.halt("expired", "the campaign's duration is over")

    def own(self) -> None:
        """Raise LeaseLost unless this worker still holds the lease of the unit
        this thread works: checked before each unit step and each step that acts
        on a device (at most once a second), so a worker stopped (SIGSTOP, a
        database outage) past its lease and taken over stops instead of carrying on."""
        if self._lost():
            raise LeaseLost(f"campaign {self.cid}: the lease of {getattr(self._unit, 'name', '?')} was taken over: "
                            "this worker stops it")
        owner = getattr(self._unit, "owner", None)
        if owner is None:
            return
        now = time.monotonic()
        if now - self._unit.checked < 1.0:
            return
        self._unit.checked = now
        if not self.ledger.holds(self.cid, self._unit.name, owner):
            self._unit.lost.set()
            raise LeaseLost(f"campaign {self.cid}: {self._unit.name} was taken over by another worker: this worker "
                            "stops it")

    def _check_abort(self) -> None:
        a = self.plan.abort
        counts = self.ledger.counts(self.cid).get("", {})
        finished = sum(counts.get(s, 0) for s in ("OK", "KO", "UNREACHABLE", "ERROR"))
        failed = sum(counts.get(s, 0) for s in a.count)
        if a.tripped(failed, finished):
            self.halt("aborted", f"{failed} of {finished} finished devices failed ({', '.join(a.count)}), "
                                 f"at or over the abort threshold of {a.threshold:.0%}")

    def _window(self) -> bool:
        """Wait until the time window is open; False when it will not open again
        before the campaign ends (or the campaign is stopping)."""
        announced = False
        while not self.stopping():
            now = time.time()
            is_open, nxt = self.plan.window_state(now)
            if is_open:
                return True
            if nxt is None or nxt >= self.deadline:
                self.halt("expired", "the time window does not open again before the campaign ends")
                return False
            if not announced:
                self.step(f"waiting for the time window: opens {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(nxt))}"
                          " UTC")
                announced = True
            self._stop.wait(min(nxt - now, 30.0))
        return False

    # -- the campaign --------------------------------------------------------------
    def run(self, *, lease: float = 15.0, concurrency: int | None = None, reclaim_local: bool = True) -> Summary:
        """Work this campaign as one worker among any others, until it has ended."""
        if self.row["state"] != "running" and self.row["finished"] is not None:
            raise PlanError(f"campaign {self.cid} is {self.row['state']}: nothing to resume")
        self._expand_known()
        w = Worker(self.store, self.ledger, concurrency=concurrency or self.plan.concurrency, lease=lease,
                   campaigns=[self.cid], timeout=self.timeout, retries=self.retries, step=self.step,
                   reclaim_local=reclaim_local, until_finished=True)
        w.runners[self.cid] = self
        try:
            w.run()
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        if self.lost_lease is not None:
            raise self.lost_lease  # exit 11: another worker carried our unit on; we stopped
        return self.summary()

    def summary(self) -> Summary:
        c = self.ledger.campaign(self.cid)
        assert c is not None
        counts = self.ledger.counts(self.cid).get("", {})
        state = c["state"] if c["finished"] is not None else (c["state"] if c["state"] != "running" else "running")
        return Summary(self.cid, state, c["reason"] or "", counts, self.ledger.workorders(self.cid, "open"))

    def work(self, unit: dict[str, Any], lost: threading.Event, owner: str | None = None) -> None:
        """One leased unit; `lost` is set when the lease was lost (the unit stops)."""
        self._unit.lost = lost
        self._unit.owner = owner
        self._unit.name = str(unit["unit"])
        self._unit.checked = 0.0
        try:
            g = self.plan.groups[int(unit["phase"])]
            if unit["kind"] == "direct":
                self._direct(g, str(unit["unit"]))
            else:
                ct = next(c for c in g.concentrators if c.address == unit["unit"])
                self._concentrator(g, ct)
        except LeaseLost as e:
            self.lost_lease = self.lost_lease or e
            self.step(str(e))
        except Exception as e:  # noqa: BLE001 - a bug in one unit must not stop the others unrecorded
            log.exception("campaign unit failed")
            self.halt("aborted", f"internal error: {type(e).__name__}: {e}")
        finally:
            self._unit.lost = None
            self._unit.owner = None

    def advance(self) -> bool:
        """Move the campaign on when its phase's units are all done (the group's
        success threshold gates the next one), and wind it up once it is over and
        no worker holds a live lease in it. One worker at a time, under the
        campaign's row lock. True when the campaign has finished."""
        msg: list[str] = []

        def go() -> str | None:
            c = self.ledger.lock_campaign(self.cid)
            if c is None or c["finished"] is not None:
                return "finished"
            if c["state"] == "running":
                phase = int(c["phase"])
                units = [u for u in self.ledger.units(self.cid) if int(u["phase"]) == phase]
                if any(u["state"] != "done" for u in units):
                    return None
                if phase < len(self.plan.groups):
                    g = self.plan.groups[phase]
                    rows = self.ledger.devices(self.cid, grp=g.name)
                    ok = sum(r["state"] == "OK" for r in rows)
                    share = ok / len(rows) if rows else 1.0
                    if share < g.success_threshold:
                        reason = (f"group {g.name} ended with {ok} of {len(rows)} OK ({share:.0%}), below its "
                                  f"success threshold of {g.success_threshold:.0%}")
                        self.ledger.stop_campaign(self.cid, "halted", reason)
                        msg.append(f"campaign halted: {reason}")
                        return None  # wound up at the next call, once nobody holds a lease
                if phase + 1 < len(self.plan.groups):
                    g = self.plan.groups[phase + 1]
                    self.ledger.set_campaign(self.cid, phase=phase + 1)
                    self.ledger.event(self.cid, "phase", grp=g.name)
                    msg.append(f"group {g.name}: {len(g.devices)} devices, {len(g.concentrators)} concentrators")
                    return "phase"
                return self._wind_up(c)
            if self.ledger.live_leases(self.cid):
                return None
            return self._wind_up(c)

        r = self.store.db.run(go)
        for m in msg:
            self.step(m)
        if r == "wound":
            self._stop.set()
            self.step(f"campaign {self.cid} ended")
        return r in ("finished", "wound")

    def _wind_up(self, c: dict[str, Any]) -> str:
        """The end of the campaign (inside advance's transaction): untried devices
        CANCELLED, failures become work orders, the final state."""
        state = c["state"] if c["state"] != "running" else "done"
        reason = c["reason"] or "" if state != "done" else ""
        if state == "aborted" and not reason:
            reason = "aborted by the operator"
        for r in self.ledger.devices(self.cid):
            if r["state"] not in FINAL:
                self.ledger.finish_device(self.cid, r["target"], "CANCELLED", f"not upgraded: campaign {state}",
                                          final=True, count=False)
        wos = []
        for r in self.ledger.devices(self.cid):
            if r["state"] in FAILED and self.ledger.open_workorder(self.cid, r, self.version):
                wos.append(r)
        if wos:
            self.ledger.event(self.cid, "workorders", reason=f"{len(wos)} work orders opened")
        self.ledger.set_campaign(self.cid, state=state, reason=reason, finished=time.time(), pid=None)
        self.ledger.event(self.cid, "end", result=state, reason=reason)
        return "wound"

    # -- results ------------------------------------------------------------------
    def _final(self, row: dict[str, Any], result: str) -> bool:
        """Whether a failure of this class ends the target (its retries are spent)."""
        if result == "OK":
            return True
        col = {"UNREACHABLE": "fails_unreachable", "KO": "fails_ko", "ERROR": "fails_error"}[result]
        return int(row[col]) + 1 > self.plan.retries.get(result, 0)

    # -- direct devices ------------------------------------------------------------
    def _direct(self, g: Group, address: str) -> None:
        while True:
            row = self.ledger.device_row(self.cid, address)
            assert row is not None
            if row["state"] in FINAL or self.stopping() or not self._window():
                return
            self.own()
            self.ledger.start_attempt(self.cid, address, g.name)
            self.step(f"{address}: upgrading (attempt {int(row['attempts']) + 1})")
            result, reason, extra = self._upgrade_direct(address)
            if extra.pop("duplicate_of", None) is not None:
                self.ledger.finish_device(self.cid, address, "CANCELLED", reason, final=True, count=False,
                                          device=extra.get("device"))
                self.step(f"{address}: {reason}")
                return
            final = self._final(row, result)
            self.ledger.finish_device(self.cid, address, result, reason, final=final, **extra)
            self.step(f"{extra.get('device') or address}: {result}{'' if final else ' (will retry)'} {reason}")
            self._check_abort()
            if final:
                return
            self._stop.wait(self.plan.retry_delay)

    def _upgrade_direct(self, address: str) -> tuple[str, str, dict[str, Any]]:
        try:
            t = from_address(port=address)
            t.open()
        except TransportError as e:
            return "UNREACHABLE", str(e), {}
        dup: list[str] = []

        def claim(device_id: str) -> None:
            other = self.ledger.claim_device(self.cid, address, device_id)
            if other is not None:
                dup.append(other)
                raise _Duplicate(f"{address} answers as {device_id}, the device of target {other}: not upgraded "
                                 "a second time")

        def step(text: str) -> None:
            self.own()  # before each step that acts on the device
            log.info("%s: %s", address, text)

        up = Upgrader(SMPClient(t, timeout=self.timeout, retries=self.retries), self.store,
                      reset_timeout=self.plan.device_timeout, campaign=self.cid, claim=claim, step=step,
                      progress=lambda done, total: self.own())
        try:
            res = up.run(self.data)
            result, reason = res.result, res.reason
        except LeaseLost:
            t.close()
            raise
        except _Duplicate as e:
            t.close()
            return "CANCELLED", str(e), {"duplicate_of": dup[0], "device": None}
        except NotRecorded as e:
            # The device reached an outcome (verified, when it is OK) that the records
            # table could not take: it is spooled for `records import`. The ledger
            # follows the device, saying where its records row waits.
            last = up.last
            result = last.result if last is not None else "ERROR"
            reason = f"{last.reason if last is not None else ''} ({e})"
        except (UpgradeKO, SilentAfterReset) as e:
            result, reason = "KO", str(e)
        except TransportError as e:
            result, reason = "UNREACHABLE", str(e)
        except MeterotaError as e:
            result, reason = "ERROR", str(e)
        finally:
            t.close()
        extra: dict[str, Any] = {}
        last = up.last
        if last is not None:
            extra["device"] = last.device
            if last.from_version:
                extra["from_version"] = last.from_version
            if result != "UNREACHABLE":
                extra["last_seen"] = time.time()
            conf = last.confirmation
            if conf:
                extra.update(record=bytes.fromhex(conf["record"]), mac=bytes.fromhex(conf["mac"]), verified=True)
        return result, reason, extra

    # -- concentrators -------------------------------------------------------------
    def _expand_known(self) -> None:
        """Meter lists of "all" concentrators, where reachable now, so the totals
        are known from the start; the others are expanded in their phase."""
        for g in self.plan.groups:
            for ct in g.concentrators:
                if ct.meters is None and not self.ledger.devices_via(self.cid, ct.address):
                    try:
                        with self._conc(ct.address) as conc:
                            self._expand(g, ct, conc)
                    except MeterotaError as e:
                        self.step(f"{ct.address}: meters not listed yet ({e})")

    def _conc(self, address: str) -> "_ConcLink":
        return _ConcLink(address, self.timeout, self.retries)

    def _expand(self, g: Group, ct: ConcentratorTarget, conc: Concentrator) -> dict[str, dict[str, Any]]:
        meters = {str(m["id"]): m for m in conc.meters()}
        conc_id = str((conc.c.device_info or {}).get("id") or ct.address)
        wanted = list(meters) if ct.meters is None else ct.meters
        for m in wanted:
            self.ledger.add_target(self.cid, m, g.name, "meter", device=m, via=ct.address, address=ct.address,
                                   image_hash=self.hash.hex(), version=self.version)
            self.ledger.update_device(self.cid, m, via=conc_id)
            if m not in meters:
                row = self.ledger.device_row(self.cid, m)
                if row and row["state"] not in FINAL:
                    self.ledger.finish_device(self.cid, m, "ERROR", f"not a meter of {conc_id}", final=True)
        return meters

    def _concentrator(self, g: Group, ct: ConcentratorTarget) -> None:
        """One concentrator's share of the campaign. A failure of the
        concentrator itself (no link, or a request it failed) is retried as a
        whole, at least once: it says nothing about its meters."""
        tries = 0
        while not self.stopping():
            try:
                with self._conc(ct.address) as conc:
                    self._concentrator_rounds(g, ct, conc)
                return
            except MeterotaError as e:
                tries += 1
                result = "UNREACHABLE" if isinstance(e, TransportError) else "ERROR"
                if tries > max(1, self.plan.retries["UNREACHABLE"]):
                    self._lose_concentrator(ct, f"concentrator {ct.address}: {e}", result)
                    return
                self.step(f"{ct.address}: {e}; retrying in {self.plan.retry_delay:g} s")
                self._stop.wait(self.plan.retry_delay)

    def _lose_concentrator(self, ct: ConcentratorTarget, reason: str, result: str) -> None:
        for r in self.ledger.devices_via(self.cid, ct.address):
            if r["state"] not in FINAL:
                self.ledger.finish_device(self.cid, r["target"], result, reason, final=True)
        self.step(reason)
        self._check_abort()

    def _open_rows(self, address: str) -> list[dict[str, Any]]:
        return [r for r in self.ledger.devices_via(self.cid, address) if r["state"] not in FINAL]

    def _concentrator_rounds(self, g: Group, ct: ConcentratorTarget, conc: Concentrator) -> None:
        self._expand(g, ct, conc)
        conc_id = str((conc.c.device_info or {}).get("id") or ct.address)
        jobs = [j for j in self.ledger.jobs(self.cid) if j["concentrator"] == ct.address]
        rnd = jobs[-1]["round"] if jobs else 0
        if jobs and jobs[-1]["state"] in ("collected", "cancelled"):
            rnd += 1
        while not self.stopping():
            rows = self._open_rows(ct.address)
            if not rows or not self._window():
                return
            job = self._job_for_round(conc, ct, rnd, [r["target"] for r in rows], conc_id)
            self._follow(conc, ct, rnd, job, conc_id)
            rnd += 1

    def _job_for_round(self, conc: Concentrator, ct: ConcentratorTarget, rnd: int, targets: list[str],
                       conc_id: str) -> int:
        known = self.ledger.job(self.cid, ct.address, rnd)
        if known and known["job"] is not None:
            self.step(f"{conc_id}: following job {known['job']} (round {rnd})")
            return int(known["job"])
        if known:  # killed between creating the job and writing its id down: find it
            ours = {int(j["job"]) for j in self.ledger.jobs(self.cid)
                    if j["job"] is not None and j["concentrator"] == ct.address}
            mine = [s for s in conc.status() if bytes(s["hash"]) == self.hash and int(s["job"]) not in ours
                    and s["state"] not in ("done", "cancelled")]
            if mine:
                job = int(mine[-1]["job"])
                self.ledger.put_job(self.cid, ct.address, rnd, job, "running")
                self.step(f"{conc_id}: found job {job} again (round {rnd})")
                return job
        self.step(f"{conc_id}: storing the image")
        conc.store(self.data)
        self.ledger.put_job(self.cid, ct.address, rnd, None, "creating")
        now = time.time()
        close = self.plan.window_close(now)
        end = min(self.deadline, close) if close else self.deadline
        window = (int(now), int(close)) if close else None
        job = conc.create_job(self.hash, JobSpec(targets=targets, priority=self.plan.priority,
                                                 retries=self.plan.retries["UNREACHABLE"],
                                                 duration=max(1, int(end - now)), window=window))
        self.ledger.put_job(self.cid, ct.address, rnd, job, "running")
        for t in targets:
            row = self.ledger.device_row(self.cid, t)
            self.ledger.start_attempt(self.cid, t, row["grp"] if row else "", via=conc_id)
        self.step(f"{conc_id}: job {job} for {len(targets)} meters (round {rnd})")
        return job

    def _follow(self, conc: Concentrator, ct: ConcentratorTarget, rnd: int, job: int, conc_id: str) -> None:
        seen = int((self.ledger.job(self.cid, ct.address, rnd) or {}).get("seen") or 0)
        cancelled = False
        while True:
            st = conc.status(job)[0]
            finished = int(st["ok"]) + int(st["ko"]) + int(st["unreachable"])
            if finished > seen:
                seen = self._collect(conc, ct, rnd, job, seen, conc_id)
            if st["state"] in ("done", "cancelled"):
                if finished > seen:
                    seen = self._collect(conc, ct, rnd, job, seen, conc_id)
                self.ledger.put_job(self.cid, ct.address, rnd, job, "collected" if st["state"] == "done"
                                    else "cancelled")
                return
            if self.interrupted or self._lost():
                return  # the job goes on in the concentrator; `campaign resume` or another worker follows it
            if self.stopping() and not cancelled:
                self.step(f"{conc_id}: cancelling job {job}")
                conc.cancel(job)
                cancelled = True
                continue
            if self.stopping():
                time.sleep(POLL_S)  # cancelled: poll until the concentrator reports the job ended
            else:
                self._stop.wait(POLL_S)

    def _collect(self, conc: Concentrator, ct: ConcentratorTarget, rnd: int, job: int, seen: int,
                 conc_id: str) -> int:
        new = list(conc.results_from(job, seen))
        down: dict[str, Any] | None = None
        for e in new:
            if e["result"] == "UNREACHABLE" and down is None:
                down = {str(m["id"]): m for m in conc.meters()}
            self._meter_result(e, conc_id, down, job)
            seen += 1
            self.ledger.job_seen(self.cid, ct.address, rnd, seen)
        self._check_abort()
        return seen

    def _meter_result(self, e: dict[str, Any], conc_id: str, meters: dict[str, Any] | None, job: int) -> None:
        take_meter_result(self.ledger, self.store, self.cid, self.plan, self.hash, self.version, e, conc_id, job,
                          meters)


class _Duplicate(MeterotaError):
    """A direct target answers with the id of a device another target is."""


def take_meter_result(ledger: Ledger, store: Store, cid: str, plan: Plan, image_hash: bytes, version: str,
                      e: dict[str, Any], conc_id: str, job: int, meters: dict[str, Any] | None) -> None:
    """One relayed result into the records (concentrator.record_relayed: verified,
    fresh, once) and the ledger. A meter marked CANCELLED (an abort) still takes
    the outcome its cancelled job reached on it: the ledger follows the device."""
    target = str(e["meter"])
    row = ledger.device_row(cid, target)
    if row is None:
        return
    result = str(e["result"])
    attempts = int(e.get("attempts", 0))
    t = float(e.get("t") or time.time())
    if row["state"] in FINAL and not (row["state"] == "CANCELLED" and result in ("OK", "KO") and "rec" in e):
        return
    if result == "UNREACHABLE" and attempts == 0:
        # Never tried: the job's window or duration ran out first. Try again in the next round.
        if row["state"] not in FINAL:
            ledger.finish_device(cid, target, result, str(e.get("reason", "")), final=False, count=False)
        return
    rel = record_relayed(e, store, image_hash, version, conc_id, conc_id, job, cid)
    result, reason, conf = rel.result, rel.reason, rel.conf
    if row["state"] == "CANCELLED" and conf is None:
        return  # nothing verified to say the cancelled job did more than it was said to
    last_seen: float | None = t
    if result == "UNREACHABLE":
        m = (meters or {}).get(target, {})
        last_seen = float(m["since"]) if m.get("version") and m.get("since") else None
    if result == "UNREACHABLE" or result == "OK":
        final = True  # the job spent its retries
    else:
        col = {"KO": "fails_ko", "ERROR": "fails_error"}[result]
        final = int(row[col]) + 1 > plan.retries.get(result, 0)
    ledger.finish_device(cid, target, result, reason, final=final,
                         from_version=conf.previous_version if conf else None,
                         record=conf.raw if conf else None, mac=conf.mac if conf else None,
                         verified=conf is not None, last_seen=last_seen, attempts=attempts, t=t)


class _ConcLink:
    """A concentrator session: connect on enter, close on exit."""

    def __init__(self, address: str, timeout: float, retries: int):
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.client: SMPClient | None = None

    def __enter__(self) -> Concentrator:
        t = from_address(port=self.address)
        t.open()
        self.client = SMPClient(t, timeout=self.timeout, retries=self.retries)
        try:
            self.client.connect()
        except BaseException:
            t.close()
            raise
        return Concentrator(self.client)

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.t.close()


class ImageMismatch(PlanError):
    """This worker's image is not the campaign's: it must not take the campaign's work."""

    exit_code = EXIT_REFUSED


class Worker:
    """Takes units of running campaigns under leases and works them, up to
    `concurrency` at a time: any number of workers on any number of hosts share
    the campaigns of one PostgreSQL ledger (or of one SQLite file on one host).

    A lease lasts `lease` seconds on the database's clock and is renewed every
    third of it; a worker that dies loses its units when their leases run out
    and another takes them on, following what the ledger says (a concentrator
    job by its id; a direct device already on the image is OK without upload).
    After connecting, and after the database came back from an outage, a worker
    takes no expired lease for one lease period: the live owners renew theirs
    first. `reclaim_local` (campaign run/resume: the operator's own host) frees at
    once the leases of dead processes of this host."""

    def __init__(self, store: Store, ledger: Ledger, *, concurrency: int = 4, lease: float = 15.0,
                 campaigns: list[str] | None = None, timeout: float = 3.0, retries: int = 3,
                 step: Callable[[str], None] | None = None, image: str | None = None,
                 reclaim_local: bool = False, until_finished: bool = False, until_idle: bool = False):
        self.store = store
        self.ledger = ledger
        self.concurrency = max(1, concurrency)
        self.lease = lease
        self.scope = campaigns
        self.timeout = timeout
        self.retries = retries
        self.step: Callable[[str], None] = step or (lambda s: log.info(s))
        self.image = image
        self.reclaim_local = reclaim_local
        self.until_finished = until_finished
        self.until_idle = until_idle
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.runners: dict[str, Runner] = {}
        self.refused: dict[str, str] = {}
        self.active: dict[tuple[str, str], tuple[Future[None], threading.Event]] = {}
        self.took = 0
        self._wake = threading.Event()

    def _runner(self, cid: str) -> Runner | None:
        if cid in self.refused:
            return None
        r = self.runners.get(cid)
        if r is None:
            try:
                r = Runner(self.store, self.ledger, cid, timeout=self.timeout, retries=self.retries, step=self.step,
                           image=self.image)
            except (PlanError, ImageError) as e:
                self.refused[cid] = str(e)
                self.step(str(e))
                if self.scope is not None and cid in self.scope:
                    raise
                return None
            self.runners[cid] = r
        return r

    def _reclaim_dead_local(self) -> None:
        for owner in self.ledger.lease_owners(f"{self.host}:"):
            pid = owner.split(":")[1]
            if owner != self.owner and pid.isdigit() and not _pid_alive(int(pid)):
                n = self.ledger.release_owner(owner)
                if n:
                    self.step(f"freed {n} units of {owner}: that process of this host is gone")

    def _campaigns(self) -> list[str]:
        return list(self.scope) if self.scope is not None else self.ledger.unfinished()

    def run(self) -> None:
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="unit")
        last_renew = time.monotonic()
        try:
            if self.reclaim_local:
                self._reclaim_dead_local()
            for cid in self._campaigns():
                self._runner(cid)
            while True:
                self._wake.clear()
                now = time.monotonic()
                if now - last_renew >= self.lease / 3:
                    self._renew()
                    last_renew = now
                self._reap()
                for runner in list(self.runners.values()):
                    runner.poll()
                finished = [cid for cid in self._campaigns() if cid not in self.refused
                            and (r := self._runner(cid)) is not None and not self._holds(cid) and r.advance()]
                if self.until_finished and self.scope is not None and set(self.scope) <= set(finished) | set(
                        self.refused):
                    return
                self._claim(pool)
                if self.until_idle and not self.active and not [c for c in self._campaigns()
                                                                if c not in self.refused]:
                    return
                self._wake.wait(POLL_S)
        except KeyboardInterrupt:
            for r in self.runners.values():
                r.interrupted = True
                r._stop.set()
            for (cid, unit), (f, _) in list(self.active.items()):
                try:
                    f.result()
                except BaseException:  # noqa: BLE001 - it is logged by the unit; we are leaving
                    pass
                self.ledger.release_unit(cid, unit, self.owner, done=False)
            self.active.clear()
            raise
        finally:
            pool.shutdown(wait=True)

    def _holds(self, cid: str) -> bool:
        return any(c == cid for c, _ in self.active)

    def _claim(self, pool: ThreadPoolExecutor) -> None:
        scope = [c for c in self._campaigns() if c not in self.refused]
        expired_too = time.monotonic() - self.store.db.connected_at >= self.lease
        while len(self.active) < self.concurrency and scope:
            u = self.ledger.claim_unit(self.owner, self.lease, scope, expired_too=expired_too)
            if u is None:
                return
            cid, unit = str(u["campaign"]), str(u["unit"])
            r = self._runner(cid)
            if r is None:
                self.ledger.release_unit(cid, unit, self.owner, done=False)
                scope.remove(cid)
                continue
            if u["previous_owner"] and u["leases"] > 1:
                self.step(f"{unit}: taking it over from {u['previous_owner']} (its lease ran out)")
                self.ledger.event(cid, "takeover", target=unit, grp=str(u["grp"]),
                                  reason=f"{self.owner} after {u['previous_owner']}")
            self.took += 1
            lost = threading.Event()
            f = pool.submit(r.work, u, lost, self.owner)
            f.add_done_callback(lambda _f: self._wake.set())
            self.active[(cid, unit)] = (f, lost)

    def _reap(self) -> None:
        for key, (f, _) in list(self.active.items()):
            if f.done():
                del self.active[key]
                r = self.runners.get(key[0])
                self.ledger.release_unit(key[0], key[1], self.owner, done=not (r and r.interrupted))

    def _renew(self) -> None:
        if not self.active:
            return
        held = self.ledger.renew_leases(self.owner, self.lease)
        for key, (_, lost) in self.active.items():
            if key not in held and not lost.is_set():
                msg = (f"campaign {key[0]}: {key[1]} was taken over by another worker (this one was away longer "
                       "than its lease): this worker stops it")
                self.step(msg)
                r = self.runners.get(key[0])
                if r is not None and r.lost_lease is None:
                    r.lost_lease = LeaseLost(msg)
                lost.set()


def abort(ledger: Ledger, cid: str, reason: str, timeout: float = 3.0, retries: int = 3,
          job_wait: float = 120.0) -> list[str]:
    """Mark a campaign aborted. A running `campaign run` (the workers holding its
    units' leases) notices within a second, cancels its jobs and takes their results
    in. When none runs, this cancels the open jobs, waits
    for each to end (a meter in flight finishes) and takes in what they did
    before the rest become CANCELLED. Returns what was done, a line each."""
    c = ledger.campaign(cid)
    if c is None:
        raise PlanError(f"no campaign {cid}")
    if c["state"] != "running":
        raise PlanError(f"campaign {cid} is {c['state']}, not running")
    ledger.stop_campaign(cid, "aborted", reason)
    here = socket.gethostname()
    # Live leases, less those of processes of this host that are gone (killed): nobody would wind it up.
    live = [u for u in ledger.live_leases(cid) if not (str(u["owner"]).split(":")[0] == here
                                                       and not _pid_alive(int(str(u["owner"]).split(":")[1])))]
    done = [f"campaign {cid} marked aborted"]
    if live:
        owners = sorted({str(u["owner"]) for u in live})
        done.append(f"the running campaign process{'es' if len(owners) > 1 else ''} ({', '.join(owners)}) "
                    "stop their work, cancel their jobs, take their results in and wind the campaign up")
        return done
    plan = Plan.from_dict(c["plan"])
    for j in ledger.jobs(cid):
        if j["state"] in ("running", "creating") and j["job"] is not None:
            job = int(j["job"])
            try:
                with _ConcLink(j["concentrator"], timeout, retries) as conc:
                    conc.cancel(job)
                    conc.wait(job, job_wait)  # "cancelling" while a meter is in flight
                    conc_id = str((conc.c.device_info or {}).get("id") or j["concentrator"])
                    seen = int(j["seen"] or 0)
                    taken = 0
                    for e in list(conc.results_from(job, seen)):
                        take_meter_result(ledger, ledger.store, cid, plan, bytes.fromhex(c["image_hash"]),
                                          c["version"], e, conc_id, job, None)
                        seen += 1
                        taken += 1
                        ledger.job_seen(cid, j["concentrator"], j["round"], seen)
                ledger.put_job(cid, j["concentrator"], j["round"], job, "cancelled")
                done.append(f"job {job} on {j['concentrator']} cancelled" +
                            (f"; {taken} results it reached taken in" if taken else ""))
            except MeterotaError as e:
                done.append(f"job {job} on {j['concentrator']} NOT cancelled: {e}")
    for r in ledger.devices(cid):
        if r["state"] not in FINAL:
            ledger.finish_device(cid, r["target"], "CANCELLED", f"not upgraded: campaign aborted ({reason})",
                                 final=True, count=False)
    ledger.set_campaign(cid, finished=time.time())
    ledger.event(cid, "end", result="aborted", reason=reason)
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_field_upgrade(ledger: Ledger, cid: str, res: Any) -> list[dict[str, Any]]:
    """A technician's `upgrade --campaign ID`: its verified outcome goes into
    the campaign's ledger, and an OK closes the device's work orders."""
    rows = [r for r in ledger.rows_for_device(res.device) if r["campaign"] == cid]
    c = ledger.campaign(cid)
    assert c is not None
    if rows:
        target = rows[0]["target"]
    else:  # a device the plan did not name (a replaced meter): it joins the ledger as a field target
        target = res.device
        ledger.add_target(cid, target, "field", "direct", device=res.device, address=res.address,
                          image_hash=res.image_hash, version=res.to_version)
    conf = res.confirmation or {}
    # Only a verified OK record of this image closes a work order (Upgrader says OK on nothing less).
    ok = res.result == "OK" and res.image_hash == c["image_hash"] and conf.get("result") == "OK" \
        and conf.get("hash") == c["image_hash"]
    ledger.update_device(cid, target, attempts=int((ledger.device_row(cid, target) or {}).get("attempts", 0)) + 1,
                         last_attempt=time.time())
    ledger.finish_device(cid, target, res.result, f"field upgrade: {res.reason}", final=True, device=res.device,
                         from_version=res.from_version, record=bytes.fromhex(conf["record"]) if conf else None,
                         mac=bytes.fromhex(conf["mac"]) if conf else None, verified=bool(conf),
                         last_seen=time.time(), source="field", count=False, kind="field")
    return ledger.close_workorders(res.device, c["image_hash"], res.record_id) if ok else []
