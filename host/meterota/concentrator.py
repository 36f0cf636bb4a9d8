"""Talking to a concentrator (user group 65): its meters, its image store and
jobs; relayed confirmation records are verified here with each meter's key."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from . import image as img
from .client import SMPClient, UploadStats
from .confirm import Confirmation, verify
from .errors import ConfirmationError, DeviceTimeout, RefusedError, StaleRecord
from .protocol import Op
from .store import Outcome, Store

GROUP = 65
FINAL = ("done", "cancelled")


@dataclass
class JobSpec:
    targets: list[str] | None = None  # None: all meters
    priority: int = 0
    retries: int = 2
    duration: int = 3600
    window: tuple[int, int] | None = None  # absolute epoch seconds [not before, not after]
    parallel: int | None = None  # meters worked on at once (None: the concentrator's own setting)
    mode: str | None = None  # "auto" | "multicast" | "unicast" (None: the concentrator's default)


class Concentrator:
    def __init__(self, client: SMPClient):
        self.c = client

    def meters(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            r = self.c.request(Op.READ, GROUP, 0, {"start": len(out)} if out else {}, what="list meters")
            out += r["meters"]
            if "next" not in r or not r["meters"]:
                return out

    def store_info(self) -> dict[str, Any] | None:
        try:
            return self.c.request(Op.READ, GROUP, 2, what="read the image store")
        except RefusedError:
            return None

    def store(self, data: bytes, progress: Callable[[int, int], None] | None = None) -> UploadStats | None:
        """Put `data` in the concentrator's image store, unless it is already there."""
        info = img.checked(data)  # refuse a corrupt file before uploading it (ImageError, exit 8)
        have = self.store_info()
        if have and bytes(have["hash"]) == info.hash:
            return None
        return self.c.upload(data, target=(GROUP, 1), progress=progress)

    def create_job(self, image_hash: bytes, spec: JobSpec) -> int:
        body: dict[str, Any] = {"hash": image_hash, "priority": spec.priority, "retries": spec.retries,
                                "duration": spec.duration}
        if spec.targets is not None:
            body["targets"] = list(spec.targets)
        if spec.window is not None:
            body["window"] = list(spec.window)
        if spec.parallel is not None:
            body["parallel"] = spec.parallel
        if spec.mode is not None:
            body["mode"] = spec.mode
        return int(self.c.request(Op.WRITE, GROUP, 3, body, what="create job")["job"])

    def status(self, job: int | None = None) -> list[dict[str, Any]]:
        return list(self.status_full(job)["jobs"])

    def status_full(self, job: int | None = None) -> dict[str, Any]:
        """The status reply itself: `jobs`, and the engine's `heap_peak` (bytes) and `meters_at_once`."""
        body = {} if job is None else {"job": job}
        return dict(self.c.request(Op.READ, GROUP, 4, body, what="read job status"))

    def cancel(self, job: int) -> None:
        self.c.request(Op.WRITE, GROUP, 5, {"job": job}, what="cancel job")

    def results(self, job: int) -> Iterator[dict[str, Any]]:
        return self.results_from(job, 0)

    def results_from(self, job: int, start: int) -> Iterator[dict[str, Any]]:
        """The job's results from the `start`-th on, in the order they were reached."""
        while True:
            r = self.c.request(Op.READ, GROUP, 6, {"job": job, "start": start}, what="read job results")
            yield from r["results"]
            if "next" not in r:
                return
            start = int(r["next"])

    def wait(self, job: int, timeout: float, on_status: Callable[[dict[str, Any]], None] | None = None
             ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(job)[0]
            if on_status:
                on_status(st)
            if st["state"] in FINAL:
                return st
            if time.monotonic() > deadline:
                raise DeviceTimeout(f"job {job} not finished after {timeout:g} s ({st['pending']} meters pending)")
            time.sleep(0.25)  # polling the concentrator's job state at 4 Hz, not synchronisation


def verify_result(e: dict[str, Any], store: Store, image_hash: bytes, version: str | None = None
                  ) -> Confirmation | None:
    """Check a relayed record with the meter's own key; None when there is none."""
    if "rec" not in e:
        return None
    key = store.key(str(e["meter"]))
    if key is None:
        raise ConfirmationError(f"no HMAC key known for meter {e['meter']}")
    return verify(bytes(e["rec"]), bytes(e["mac"]), key, device_id=str(e["meter"]), image_hash=image_hash,
                  version=version)


def result_ref(conc_id: str, job: int, e: dict[str, Any]) -> str:
    """A relayed result's identity: the same result read again is recognised."""
    return f"relay:{conc_id}:{job}:{e['meter']}:{e.get('attempts', 0)}:{e.get('t', '')}"


@dataclass
class Relayed:
    """One relayed result as judged and recorded."""

    meter: str
    result: str
    reason: str
    attempts: int
    conf: Confirmation | None
    record_id: int | None
    duplicate: bool
    how: str | None = None  # how the image reached the meter: multicast | unicast | none
    unicast_bytes: int | None = None
    xor_blocks: int | None = None  # blocks it rebuilt from the session's broadcast XOR repair rounds

    def row(self) -> dict[str, Any]:
        return {"meter": self.meter, "result": self.result, "reason": self.reason, "attempts": self.attempts,
                "verified": self.conf is not None, "recorded": "already" if self.duplicate else "new",
                "record_id": self.record_id, "via": self.how, "unicast_bytes": self.unicast_bytes,
                "xor_blocks": self.xor_blocks}


def record_relayed(e: dict[str, Any], store: Store, image_hash: bytes, version: str | None, via: str,
                   conc_id: str, job: int, campaign: str | None = None, publish: bool | None = None) -> Relayed:
    """Judge one relayed result and record it, for `job results` and campaigns
    alike: the meter's record verified with its key (OK needs one), fresh (a
    replayed older record is an ERROR), and recorded once (read again, it is
    recognised by its reference, or by the record itself)."""
    meter = str(e["meter"])
    result, reason = str(e["result"]), str(e.get("reason", ""))
    conf: Confirmation | None = None
    try:
        conf = verify_result(e, store, image_hash, version)
        if conf is not None and result == "OK" and conf.result != "OK":
            result, reason = "KO", f"relayed OK contradicts the meter's record: {conf.reason}"
        if conf is not None and result != "UNREACHABLE":
            result = conf.result  # the meter's own word, not the concentrator's
    except ConfirmationError as err:
        result, reason = "ERROR", f"relayed record rejected: {err}"
    if result == "OK" and conf is None:
        result, reason = "ERROR", "relayed OK without the meter's confirmation record"
    t = float(e.get("t") or time.time())
    attempts = int(e.get("attempts", 1))
    o = Outcome(meter, via, conf.previous_version if conf else None, version or "?", image_hash.hex(), result,
                reason, max(1, attempts), t, t, campaign=campaign)
    ref = result_ref(conc_id, job, e)
    try:
        got = store.record(o, conf, ref, publish=publish)
    except StaleRecord as err:
        conf, result, reason = None, "ERROR", f"relayed record rejected: {err}"
        o.result, o.reason = result, reason
        got = store.record(o, None, ref, publish=publish)
    return Relayed(meter, result, reason, attempts, conf, got.id, got.duplicate, e.get("via"), e.get("unicast_bytes"),
                   e.get("xor_blocks"))


def record_results(results: list[dict[str, Any]], store: Store, image_hash: bytes, version: str, via: str,
                   campaign: str | None = None, conc_id: str | None = None, job: int = 0) -> list[dict[str, Any]]:
    """Verify every relayed record and record each meter's outcome (once);
    returns rows for output."""
    # No ledger records these, even under --campaign: the record is the outcome, so it is published.
    return [record_relayed(e, store, image_hash, None if version == "?" else version, via, conc_id or via, job,
                           campaign, publish=True).row() for e in results]
