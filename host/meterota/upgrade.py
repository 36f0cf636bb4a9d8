"""The single-device upgrade, end to end, as a library call.

check fit -> upload (resuming) -> check match and slot hash -> mark for test ->
reset -> wait for the device -> check the new image runs -> confirm (or wait
for the device's self-test) -> fetch and verify the confirmation record ->
record the outcome. Only a verified OK record is success.

Every path (bundle, native firmware, already running, finishing a trial)
reaches its verdict in one place, _finish -> Store.record (or
confirm.check_outcome without a store): OK only with a verified OK record of
this device for this image that is newer than any recorded before (or is the
very record already recorded: a no-op, not a second row).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from . import image as img
from .client import SMPClient, SMPError, UploadStats
from .protocol import FIRMWARE_IMAGE, FIRMWARE_UPLOAD_IMAGE, Group, Op
from .confirm import Confirmation, verify
from .confirm import check_outcome
from .errors import (CampaignBusy, ConfirmationError, DeviceTimeout, MeterotaError, NotRecorded, ProtocolError, RefusedError,
                     SilentAfterReset, TransportError, UpgradeKO)
from .store import Outcome, Store

log = logging.getLogger("meterota.upgrade")

Step = Callable[[str], None]


@dataclass
class UpgradeResult:
    device: str
    address: str
    result: str
    reason: str
    from_version: str | None
    to_version: str
    image_hash: str
    seconds: float
    upload: dict[str, Any] = field(default_factory=dict)
    confirmation: dict[str, Any] | None = None
    record_id: int | None = None
    skipped_upload: bool = False
    recorded: bool = False  # in the records (a new row, or the same record found there already)
    duplicate: bool = False  # the record was in the records already (record_id is that row)
    spooled: bool = False  # the database could not take it: it waits in the spool file

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_tuple(v: str) -> tuple[int, int, int, int]:
    main, _, build = v.partition("+")
    parts = [int(x) for x in main.split(".")] + [0, 0, 0]
    return parts[0], parts[1], parts[2], int(build) if build else (parts[3] if len(main.split(".")) > 3 else 0)


def _other(info: dict[str, Any]) -> dict[str, Any]:
    for s in info["slots"]:
        if not s.get("active"):
            return dict(s)
    raise ProtocolError("device reports no inactive slot")


def _active(info: dict[str, Any]) -> dict[str, Any] | None:
    for s in info["slots"]:
        if s.get("active"):
            return dict(s)
    return None


# How long a board takes from a reset to answering (boot ROM/bootloader, the firmware's start, the
# boot stage's image check, the receiver's imports): the default reset wait, by the board the
# device reports. A Pico after deploy needs ~25 s (issue 16), a stock ESP32 about as long.
RESET_WAIT = {"unix": 30.0, "rp2": 120.0, "esp32": 120.0}
RESET_WAIT_OTHER = 120.0
# A device that says how long its last boot took to answer (`ready_ms`, group 64 info) gets this
# much more per boot: twice its own figure (a bigger image, a loaded or colder board) plus what
# its figure does not count (the ROM, the firmware's own start, a USB port coming back).
BOOT_FACTOR = 2.0
BOOT_EXTRA_S = 10.0


def reset_wait(client: SMPClient, override: float | None = None, boots: int = 1) -> float:
    """The reset wait: `override` (--reset-timeout) if given, else the device's board's, never
    less than `boots` boots at the pace the device reported for its last one (a test image that
    fails at import boots twice before anything answers: itself, then the image it reverts to),
    nor a few reply waits of this link (--timeout, the measured round trip, the baud rate)."""
    if override is not None:
        return override
    info = client.device_info or {}
    board = str(info.get("board", ""))
    measured = 0.0
    ready_ms = info.get("ready_ms")
    if isinstance(ready_ms, int) and ready_ms > 0:
        measured = boots * (BOOT_FACTOR * ready_ms / 1000.0 + BOOT_EXTRA_S)
    return max(RESET_WAIT.get(board, RESET_WAIT_OTHER), 5 * client.reply_wait(64), measured)


def wait_back(client: SMPClient, timeout: float, boots_before: int, resend_reset_after: float | None = None
              ) -> dict[str, Any]:
    """After a reset: poll until the device answers from a new boot (its boot
    counter moved past `boots_before`); returns its info. If the device keeps
    answering from the old boot for `resend_reset_after` seconds, the reset
    request itself was lost: send it again."""
    deadline = time.monotonic() + timeout
    resend_at = time.monotonic() + resend_reset_after if resend_reset_after else None
    while True:
        try:
            info = client.request(Op.READ, Group.METEROTA, 0, timeout=0.5, retries=0, what="read device info")
            if int(info.get("boots", 0)) > boots_before:
                return info
            if resend_at is not None and time.monotonic() > resend_at:
                log.info("device still on the same boot: sending the reset again")
                _send_reset(client)
                resend_at = time.monotonic() + (resend_reset_after or 0)
        except DeviceTimeout:
            pass
        except TransportError:
            _reopen(client)  # a USB CDC port vanishes while the board resets
        if time.monotonic() > deadline:
            raise DeviceTimeout(f"device did not come back within {timeout:g} s after reset")


def _send_reset(client: SMPClient) -> None:
    # Its reply may be lost, or the device may reset before it leaves: the
    # boot counter, not the reply, tells whether it happened.
    try:
        client.reset()
    except DeviceTimeout:
        pass


def _fallback_version(info: dict[str, Any]) -> str | None:
    for s in info["slots"]:
        if not s.get("active") and s.get("version"):
            return str(s["version"])
    return None


def _firmware_entries(images: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The native firmware's entries of a state read (image 1), by slot."""
    return {int(e["slot"]): e for e in images if e.get("image") == FIRMWARE_IMAGE}


def firmware_refusal(e: SMPError) -> RefusedError:
    if e.group < 0 and e.rc == 8:
        return RefusedError("the device takes no native firmware images (ENOTSUP, rc 8): its board has no "
                            "OTA app partitions")
    if e.group == Group.IMAGE and e.rc == 29:
        return RefusedError("the device refused the firmware payload: not a bare ESP app image for its chip "
                            "(a combined firmware.bin, or built for another chip)")
    return e


def _reopen(client: SMPClient) -> None:
    client.t.close()
    try:
        client.t.open()
    except TransportError:
        time.sleep(0.2)  # the port is not back yet; retry at 5 Hz


class Upgrader:
    def __init__(self, client: SMPClient, store: Store | None, *, key: bytes | None = None,
                 allow_downgrade: bool = False, reset_timeout: float | None = None, confirm_timeout: float = 30.0,
                 progress: Callable[[int, int], None] | None = None, step: Step | None = None,
                 campaign: str | None = None, negotiate: bool = True,
                 claim: Callable[[str], None] | None = None):
        self.c = client
        self.store = store
        self.key = key
        self.allow_downgrade = allow_downgrade
        self.reset_timeout = reset_timeout
        self.confirm_timeout = confirm_timeout
        self.progress = progress
        self.step: Step = step or (lambda s: log.info(s))
        self.campaign = campaign
        self.negotiate = negotiate
        self.claim = claim  # called with the device id before anything is written (a campaign's dedup)
        self.last: UpgradeResult | None = None  # the outcome so far, also when run() raised

    def run(self, data: bytes) -> UpgradeResult:
        t0 = time.monotonic()
        started = time.time()
        info = img.checked(data)  # a corrupt file is ImageError (exit 8) here too, as on every path
        self.c.connect(negotiate=self.negotiate)
        dev = self.c.device_info
        if dev is None:
            raise RefusedError(f"{self.c.t.name} is an SMP device without meterota's confirmation records; "
                               "use smpmgr, or deploy meterota on it")
        device_id = str(dev["id"])
        if self.claim is not None:
            self.claim(device_id)
        key = self.key or (self.store.key(device_id) if self.store else None)
        if key is None:
            raise ConfirmationError(f"no HMAC key known for device {device_id}: pass --key or register it "
                                    "(meterota keys add)")
        active = _active(dev)
        from_version = active.get("version") if active else None
        res = UpgradeResult(device_id, self.c.t.name, "KO", "", from_version, info.version_str,
                            info.hash.hex(), 0.0)
        self.last = res
        try:
            if info.is_firmware:
                return self._firmware(res, dev, key, device_id, info, data, t0, started)
            self._check_fit(dev, info, data)
            if active and active.get("hash") == info.hash and not dev.get("trial"):
                self.step(f"{device_id} already runs {info.version_str}")
                return self._already(res, key, device_id, info, "already running this image", t0, started)
            before = self._record_seq(key, device_id)
            if active and active.get("hash") == info.hash and dev.get("trial"):
                # An earlier attempt got as far as the trial boot: finish it.
                self.step("the device already runs this image on trial; finishing the upgrade")
                res.skipped_upload = True
                res.from_version = _fallback_version(dev)
                return self._after_boot(res, dev, key, device_id, info, before, t0, started)
            res.upload = asdict(self._upload(dev, info, data))
            back = self._test_and_reset(res, info, "image", t0, started)
            return self._after_boot(res, back, key, device_id, info, before, t0, started)
        except CampaignBusy:
            raise  # a campaign that lost its lease: the device was not acted on after this, nothing to record
        except MeterotaError as e:
            if not res.recorded and not res.spooled:
                res.result = "UNREACHABLE" if isinstance(e, TransportError) else "ERROR"
                res.reason = str(e)
                res.confirmation = None
                self._finish(res, t0, started, None)
            raise

    def _already(self, res: UpgradeResult, key: bytes, device_id: str, info: img.ImageInfo, why: str,
                 t0: float, started: float) -> UpgradeResult:
        """The device already runs the image: OK only on its standing record,
        verified with our key and fresh (or the very record recorded already)."""
        res.skipped_upload = True
        conf = self._standing_record(key, device_id, info)
        res.result, res.reason = "OK", why
        res.from_version = conf.previous_version
        res.confirmation = conf.as_dict()
        return self._finish(res, t0, started, conf)

    def _after_boot(self, res: UpgradeResult, back: dict[str, Any], key: bytes, device_id: str,
                    info: img.ImageInfo, before: int, t0: float, started: float) -> UpgradeResult:
        """From the first boot after the reset: check what runs, confirm, verify.
        Called inside run()'s try, which records any failure."""
        now = _active(back)
        if not now or now.get("hash") != info.hash:
            conf = self._confirmation(key, device_id, info, before, expect_ok=False)
            res.reason = conf.reason if conf else "device did not boot the new image"
            res.confirmation = conf.as_dict() if conf else None
            self._finish(res, t0, started, conf)
            raise UpgradeKO(f"{device_id}: KO, the device reverted to {now.get('version') if now else '?'}: "
                            f"{res.reason}")
        if back.get("trial"):
            if back.get("self_confirm"):
                self.step("waiting for the device's self-test")
                self._wait_confirmed()
            else:
                self.step("confirming the new image")
                self.c.image_confirm()
        return self._conclude(res, key, device_id, info, before, t0, started)

    def _conclude(self, res: UpgradeResult, key: bytes, device_id: str, info: img.ImageInfo, before: int,
                  t0: float, started: float) -> UpgradeResult:
        """The new image runs confirmed: its record decides, OK or KO."""
        conf = self._confirmation(key, device_id, info, before, expect_ok=True)
        assert conf is not None
        res.confirmation = conf.as_dict()
        res.result = conf.result
        res.reason = conf.reason
        if conf.result != "OK":
            self._finish(res, t0, started, conf)
            raise UpgradeKO(f"{device_id}: KO: {conf.reason}")
        return self._finish(res, t0, started, conf)

    # -- native firmware (image 1) ------------------------------------------------
    def _firmware(self, res: UpgradeResult, dev: dict[str, Any], key: bytes, device_id: str, info: img.ImageInfo,
                  data: bytes, t0: float, started: float) -> UpgradeResult:
        """The same flow for a native firmware image, through its image-1
        entries in the standard state read; called inside run()'s try."""
        if info.board and info.board != dev.get("board"):
            raise RefusedError(f"image is built for board {info.board}, the device is a {dev.get('board')} board")
        fw = _firmware_entries(self.c.image_state())
        running = fw.get(0)
        if running is None:
            raise RefusedError(f"{device_id} lists no native firmware (SMP image 1): its board has no OTA "
                               "app partitions")
        res.from_version = running.get("version")
        if running.get("hash") == info.hash and running.get("confirmed"):
            self.step(f"{device_id} already runs firmware {info.version_str}")
            return self._already(res, key, device_id, info, "already running this firmware", t0, started)
        before = self._record_seq(key, device_id)
        if running.get("hash") == info.hash:
            self.step("the device already runs this firmware on trial; finishing the upgrade")
            res.skipped_upload = True
            res.from_version = fw.get(1, {}).get("version")
            return self._firmware_after_boot(res, dev, key, device_id, info, before, t0, started)
        if not running.get("confirmed") or dev.get("trial"):
            raise RefusedError("the device is running an unconfirmed test image: confirm it or reset it first")
        if running.get("version") and not self.allow_downgrade:
            if version_tuple(info.version_str) < version_tuple(str(running["version"])):
                raise RefusedError(f"firmware {info.version_str} is older than the running {running['version']} "
                                   "(use --allow-downgrade)")
        other = fw.get(1, {})
        if other.get("hash") == info.hash:
            self.step("the free OTA partition already holds this firmware; not uploading it again")
        else:
            if other.get("pending"):
                self.step("erasing a different firmware pending in the free OTA partition")
                self.c.image_erase(3)
            self.step(f"uploading {len(data)} bytes of firmware (image {FIRMWARE_UPLOAD_IMAGE})")
            try:
                res.upload = asdict(self.c.upload(data, image=FIRMWARE_UPLOAD_IMAGE, progress=self.progress))
            except SMPError as e:
                raise firmware_refusal(e) from None
            if _firmware_entries(self.c.image_state()).get(1, {}).get("hash") != info.hash:
                raise ProtocolError("after the upload the free OTA partition does not report the image's hash")
        back = self._test_and_reset(res, info, "firmware", t0, started)
        return self._firmware_after_boot(res, back, key, device_id, info, before, t0, started)

    def _test_and_reset(self, res: UpgradeResult, info: img.ImageInfo, what: str, t0: float,
                        started: float) -> dict[str, Any]:
        """Mark for test, reset, and wait for the first boot of the new `what`;
        returns the device's info from that boot."""
        self.step(f"marking the {what} for test")
        self.c.image_test(info.hash)
        self.step(f"resetting into the new {what}")
        boots = int(self.c.info().get("boots", 0))
        _send_reset(self.c)
        try:
            # A test image that fails at import reverts before it answers: two boots.
            return wait_back(self.c, reset_wait(self.c, self.reset_timeout, boots=2), boots,
                             resend_reset_after=max(3.0, 2 * self.c.reply_wait(64)))
        except DeviceTimeout as e:
            # The device took the test image and went silent: from here only
            # a field visit tells, so this is a KO, not "unreachable".
            res.reason = f"no answer after reset into the test {what} ({e})"
            self._finish(res, t0, started, None)
            raise SilentAfterReset(f"{res.device}: KO, {res.reason}") from None

    def _firmware_after_boot(self, res: UpgradeResult, back: dict[str, Any], key: bytes, device_id: str,
                             info: img.ImageInfo, before: int, t0: float, started: float) -> UpgradeResult:
        running = _firmware_entries(self.c.image_state()).get(0, {})
        if running.get("hash") != info.hash:
            conf = self._confirmation(key, device_id, info, before, expect_ok=False)
            res.reason = conf.reason if conf else "device did not boot the new firmware"
            res.confirmation = conf.as_dict() if conf else None
            self._finish(res, t0, started, conf)
            raise UpgradeKO(f"{device_id}: KO, the device went back to firmware {running.get('version', '?')}: "
                            f"{res.reason}")
        if not running.get("confirmed"):
            if back.get("self_confirm"):
                self.step("waiting for the device's self-test")
                deadline = time.monotonic() + self.confirm_timeout
                while not _firmware_entries(self.c.image_state()).get(0, {}).get("confirmed"):
                    if time.monotonic() > deadline:
                        raise DeviceTimeout("the device did not confirm its firmware in time")
                    time.sleep(0.1)  # polling a device's state at 10 Hz; not synchronisation
            else:
                self.step("confirming the new firmware")
                self.c.image_test(info.hash, permanent=True)  # hash + confirm of the running image: confirm
        return self._conclude(res, key, device_id, info, before, t0, started)

    # -- steps ----------------------------------------------------------------
    def _check_fit(self, dev: dict[str, Any], info: img.ImageInfo, data: bytes) -> None:
        other = _other(dev)
        if info.board and info.board != dev.get("board"):
            raise RefusedError(f"image is built for board {info.board}, the device is a {dev.get('board')} board")
        if len(data) > int(other["size"]):
            raise RefusedError(f"image of {len(data)} bytes is too large for the device's {other['size']}-byte slot")
        active = _active(dev)
        if dev.get("trial") and not (active and active.get("hash") == info.hash):
            raise RefusedError("the device is running an unconfirmed test image: confirm it or reset it first")
        if active and active.get("version") and not self.allow_downgrade:
            if version_tuple(info.version_str) < version_tuple(str(active["version"])):
                raise RefusedError(f"image {info.version_str} is older than the running {active['version']} "
                                   "(use --allow-downgrade)")

    def _upload(self, dev: dict[str, Any], info: img.ImageInfo, data: bytes) -> UploadStats:
        other = _other(dev)
        if other.get("pending") and other.get("hash") != info.hash:
            self.step("erasing a different image pending in the free slot")
            self.c.image_erase(1)
        if other.get("hash") == info.hash:
            self.step("the free slot already holds this image; not uploading it again")
            return UploadStats(match=True)
        self.step(f"uploading {len(data)} bytes")
        st = self.c.upload(data, progress=self.progress)
        images = self.c.image_state()
        if not any(e.get("slot") == 1 and e.get("hash") == info.hash for e in images):
            raise ProtocolError("after the upload the free slot does not report the image's hash")
        return st

    def _record_seq(self, key: bytes, device_id: str) -> int:
        """The sequence number of the device's latest record, checked with our
        key first: a wrong key is found before anything is written."""
        try:
            r = self.c.confirmation()
        except RefusedError:
            return 0
        return verify(bytes(r["rec"]), bytes(r["mac"]), key, device_id=device_id).seq

    def _standing_record(self, key: bytes, device_id: str, info: img.ImageInfo) -> Confirmation:
        """The device's latest record, which must be a verified OK for this
        image: the proof of an upgrade that finished earlier (or while nobody
        was listening: a host killed after the confirm). Without it, "already
        running" is only the device's unauthenticated word: ConfirmationError."""
        try:
            r = self.c.confirmation()
        except RefusedError:
            raise ConfirmationError(f"{device_id} runs {info.version_str} but holds no confirmation record: "
                                    "nothing verifiable says it was upgraded") from None
        conf = verify(bytes(r["rec"]), bytes(r["mac"]), key, device_id=device_id, image_hash=info.hash,
                      version=info.version_str)
        if conf.result != "OK":
            raise ConfirmationError(f"{device_id} runs {info.version_str} but its latest record #{conf.seq} says "
                                    f"{conf.result}: {conf.reason}")
        return conf

    def _confirmation(self, key: bytes, device_id: str, info: img.ImageInfo, before: int,
                      expect_ok: bool) -> Confirmation | None:
        try:
            r = self.c.confirmation()
        except RefusedError:
            if expect_ok:
                raise ConfirmationError("the device has no confirmation record after the upgrade") from None
            return None
        if self.store:
            before = max(before, self.store.newest_seq(device_id))  # what the device said and what we recorded
        return verify(bytes(r["rec"]), bytes(r["mac"]), key, device_id=device_id, image_hash=info.hash,
                      version=info.version_str, after_seq=before)

    def _wait_confirmed(self) -> None:
        deadline = time.monotonic() + self.confirm_timeout
        while time.monotonic() < deadline:
            if not self.c.info().get("trial"):
                return
            time.sleep(0.1)  # polling a device's state at 10 Hz; not synchronisation
        raise DeviceTimeout("the device did not confirm itself in time")

    def _finish(self, res: UpgradeResult, t0: float, started: float, conf: Confirmation | None) -> UpgradeResult:
        """The verdict, for every path: into the records through Store.record,
        which refuses an OK without a verified OK record and a stale record."""
        res.seconds = time.monotonic() - t0
        if self.store is None:
            check_outcome(res.result, conf, res.device, res.image_hash)
            res.recorded = True
            return res
        o = Outcome(res.device, res.address, res.from_version, res.to_version, res.image_hash, res.result,
                    res.reason, 1, started, time.time(), campaign=self.campaign)
        try:
            got = self.store.record(o, conf, spool_extra={"field": bool(self.campaign)})
        except NotRecorded:
            res.spooled = True
            raise
        res.record_id, res.duplicate, res.recorded = got.id, got.duplicate, True
        if got.duplicate:
            res.reason += f" (record #{conf.seq if conf else '?'} is recorded already, upgrade {got.id})"
        return res
