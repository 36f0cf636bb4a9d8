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

Ownership: a campaign is run by one process at a time, the holder of its
lease (ledger.acquire: owner and expiry, taken in one transaction, renewed at
2 Hz). Every ledger write checks the lease inside its transaction and the
upgrade steps check it before they act on a device, so a process that was
stopped (SIGSTOP) past its lease and taken over stops instead of carrying on.

One device is flashed once: plan targets are compared by canonical address
(plan.py), and each direct device's answered id is claimed in the ledger
before anything is written to it (a second target answering the same id is
CANCELLED, not upgraded).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import image as img
from ..client import SMPClient
from ..concentrator import Concentrator, JobSpec, record_relayed
from ..errors import (CampaignBusy, ImageError, MeterotaError, NotRecorded, SilentAfterReset, TransportError, UpgradeKO,
                      EXIT_KO, EXIT_OK, EXIT_STOPPED)
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
    """Register a campaign and its known targets; returns its id."""
    _, info = read_image(plan.image)
    if cid is None:
        base = f"{_slug(plan.name)}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        cid, n = base, 1
        while ledger.campaign(cid) is not None:
            n += 1
            cid = f"{base}-{n}"
    elif ledger.campaign(cid) is not None:
        if ledger.owned_elsewhere(cid):
            ledger.acquire(cid)  # raises CampaignBusy naming the owner
        raise PlanError(f"campaign {cid} exists already: use `meterota campaign resume {cid}`")
    ledger.create_campaign(cid, plan.name, plan.as_dict(), plan_file, info.hash.hex(), info.version_str)
    for g in plan.groups:
        for d in g.devices:
            ledger.add_target(cid, d, g.name, "direct", address=d, image_hash=info.hash.hex(),
                              version=info.version_str)
        for ct in g.concentrators:
            for m in ct.meters or []:
                ledger.add_target(cid, m, g.name, "meter", device=m, via=ct.address, address=ct.address,
                                  image_hash=info.hash.hex(), version=info.version_str)
    ledger.event(cid, "created", reason=f"{plan.name}: {info.version_str}")
    return cid


class Runner:
    def __init__(self, store: Store, ledger: Ledger, cid: str, *, timeout: float = 3.0, retries: int = 3,
                 step: Callable[[str], None] | None = None):
        c = ledger.campaign(cid)
        if c is None:
            raise PlanError(f"no campaign {cid} in {store.path}")
        self.row = c
        self.store = store
        self.ledger = ledger
        self.cid = cid
        self.plan = Plan.from_dict(c["plan"])
        self.data, self.info = read_image(self.plan.image)
        if self.info.hash.hex() != c["image_hash"]:
            raise PlanError(f"{self.plan.image} is no longer the image campaign {cid} was created with")
        self.hash = self.info.hash
        self.version = self.info.version_str
        self.timeout = timeout
        self.retries = retries
        self.step: Callable[[str], None] = step or (lambda s: log.info(s))
        self.deadline = float(c["created"]) + self.plan.duration
        self._stop = threading.Event()
        self._halt_lock = threading.Lock()
        self.end_state: str | None = None
        self.end_reason = ""
        self.interrupted = False  # Ctrl-C: stop without ending the campaign, so it can be resumed
        self.lost: LeaseLost | None = None  # another process took the campaign over: stop, write nothing
        self.lease_until = 0.0

    # -- control ---------------------------------------------------------------
    def halt(self, state: str, reason: str) -> None:
        """Stop starting work; the first reason wins."""
        with self._halt_lock:
            if self.end_state is None:
                self.end_state, self.end_reason = state, reason
                self.ledger.event(self.cid, "abort" if state == "aborted" else state, reason=reason)
                self.step(f"campaign {state}: {reason}")
            self._stop.set()

    def stopping(self) -> bool:
        return self._stop.is_set()

    def _lose(self, e: LeaseLost) -> None:
        if self.lost is None:
            self.lost = e
            self.interrupted = True  # leave jobs and devices to the new owner
            self.step(str(e))
        self._stop.set()

    def own(self) -> None:
        """Raise LeaseLost unless this process still owns the campaign: checked
        before every unit and every step that acts on a device. Free while
        the lease we renewed has time left; past it, renewed first (a process
        resumed from SIGSTOP finds out here that it was taken over)."""
        if self.lost is not None:
            raise self.lost
        if time.time() < self.lease_until - 1.0:
            return
        try:
            self.lease_until = self.ledger.renew(self.cid)
        except LeaseLost as e:
            self._lose(e)
            raise

    def _watch(self, done: threading.Event) -> None:
        """A user's `campaign abort` (written to the ledger), the campaign's
        duration and our lease, noticed within POLL_S."""
        while not done.wait(POLL_S):
            try:
                self.lease_until = self.ledger.renew(self.cid)
            except LeaseLost as e:
                self._lose(e)
                return
            c = self.ledger.campaign(self.cid)
            if c and c["state"] == "aborted":
                self.halt("aborted", c["reason"] or "aborted by the operator")
            if time.time() >= self.deadline:
                self.halt("expired", "the campaign's duration is over")

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
    def run(self) -> Summary:
        if self.row["state"] != "running":
            raise PlanError(f"campaign {self.cid} is {self.row['state']}: nothing to resume")
        self.ledger.acquire(self.cid)  # CampaignBusy when another process runs it
        self.lease_until = time.time() + 1.0
        try:
            summary = self._run()
        except LeaseLost as e:
            self._lose(e)
            raise self.lost or e from None
        finally:
            if self.lost is None:
                self.ledger.release(self.cid)
            self.ledger.guarded = None
        if self.lost is not None:
            raise self.lost
        return summary

    def _run(self) -> Summary:
        done = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(done,), daemon=True, name="campaign-watch")
        watcher.start()
        try:
            self._expand_known()
            for i in range(int(self.row["phase"]), len(self.plan.groups)):
                g = self.plan.groups[i]
                if self.stopping():
                    break
                self.ledger.set_campaign(self.cid, phase=i)
                self.ledger.event(self.cid, "phase", grp=g.name)
                self.step(f"group {g.name}: {len(g.devices)} devices, {len(g.concentrators)} concentrators")
                self._run_group(g)
                if self.stopping():
                    break
                self._gate(g)
        finally:
            done.set()
            watcher.join()
        if self.lost is not None:
            raise self.lost
        return self._finish()

    def _gate(self, g: Group) -> None:
        rows = self.ledger.devices(self.cid, grp=g.name)
        ok = sum(r["state"] == "OK" for r in rows)
        share = ok / len(rows) if rows else 1.0
        if share < g.success_threshold:
            self.halt("halted", f"group {g.name} ended with {ok} of {len(rows)} OK ({share:.0%}), below its "
                                f"success threshold of {g.success_threshold:.0%}")

    def _run_group(self, g: Group) -> None:
        units: list[Callable[[], None]] = [lambda d=d: self._direct(g, d) for d in g.devices]  # type: ignore[misc]
        units += [lambda ct=ct: self._concentrator(g, ct) for ct in g.concentrators]  # type: ignore[misc]
        with ThreadPoolExecutor(max_workers=self.plan.concurrency, thread_name_prefix=f"grp-{g.name}") as pool:
            try:
                for f in [pool.submit(self._guard, u) for u in units]:
                    f.result()
            except KeyboardInterrupt:
                # Let the units finish the step they are in (an upgrade in
                # flight is not cut), then leave the campaign running.
                self.interrupted = True
                self._stop.set()
                raise

    def _guard(self, unit: Callable[[], None]) -> None:
        try:
            unit()
        except LeaseLost as e:
            self._lose(e)
        except Exception as e:  # noqa: BLE001 - a bug in one unit must not stop the others unrecorded
            log.exception("campaign unit failed")
            self.halt("aborted", f"internal error: {type(e).__name__}: {e}")

    def _finish(self) -> Summary:
        self.own()
        state = self.end_state or "done"
        reason = self.end_reason
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
        c = self.ledger.campaign(self.cid)
        if c and c["state"] == "aborted" and state != "aborted":  # the operator's abort raced our end
            state, reason = "aborted", c["reason"] or "aborted by the operator"
        self.ledger.set_campaign(self.cid, state=state, reason=reason, finished=time.time(), pid=None)
        self.ledger.event(self.cid, "end", result=state, reason=reason)
        counts = self.ledger.counts(self.cid).get("", {})
        return Summary(self.cid, state, reason, counts, self.ledger.workorders(self.cid, "open"))

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
            # The device reached an outcome the records could not take (spooled):
            # the ledger keeps it open, the operator imports the spool.
            result, reason = "ERROR", str(e)
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
            if self.interrupted:
                return  # the job goes on in the concentrator; `campaign resume` follows it again
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


def abort(ledger: Ledger, cid: str, reason: str, timeout: float = 3.0, retries: int = 3,
          job_wait: float = 120.0) -> list[str]:
    """Mark a campaign aborted. A running `campaign run` (the holder of its
    lease) notices within a second, cancels its jobs and takes their results
    in. When none runs, this takes the lease, cancels the open jobs, waits
    for each to end (a meter in flight finishes) and takes in what they did
    before the rest become CANCELLED. Returns what was done, a line each."""
    c = ledger.campaign(cid)
    if c is None:
        raise PlanError(f"no campaign {cid}")
    if c["state"] != "running":
        raise PlanError(f"campaign {cid} is {c['state']}, not running")
    alive = ledger.owned_elsewhere(cid)
    if not alive:
        try:
            ledger.acquire(cid)  # a stopped runner that comes back finds it taken and stops
        except CampaignBusy:
            alive = True
    ledger.set_campaign(cid, state="aborted", reason=reason)
    ledger.event(cid, "abort", reason=reason)
    done = [f"campaign {cid} marked aborted"]
    if alive:
        c = ledger.campaign(cid) or c
        done.append(f"the running campaign process ({c['owner']}) stops its work, cancels its jobs and takes "
                    "their results in")
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
    ledger.release(cid)
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
