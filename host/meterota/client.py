"""SMP client: requests with retries, and a pipelined, resumable image upload.

Unlike stop-and-wait clients it keeps up to `buf_count` upload requests in
flight and lets the device's `off` drive it, so a lost or duplicated frame costs
one rewind, not the upload. Late replies are matched by sequence number and
dropped, so a timeout never shifts later replies onto the wrong request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import cbor2

from . import protocol as P
from .errors import DeviceTimeout, ProtocolError, RefusedError
from .transport import SerialTransport, Transport

log = logging.getLogger("meterota.smp")


class SMPError(RefusedError):
    def __init__(self, group: int, rc: int, text: str, request: str):
        super().__init__(f"{request}: {text} (rc {rc}{'' if group < 0 else f', group {group}'})")
        self.group = group
        self.rc = rc


@dataclass
class DeviceParams:
    buf_size: int = 384
    buf_count: int = 1


@dataclass
class UploadStats:
    bytes: int = 0
    requests: int = 0
    rewinds: int = 0
    timeouts: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    match: bool | None = None


Progress = Callable[[int, int], None]


class SMPClient:
    def __init__(self, transport: Transport, timeout: float = 2.0, retries: int = 3):
        self.t = transport
        self.timeout = timeout
        self.retries = retries
        self._seq = 0
        self.params = DeviceParams()
        self.device_info: dict[str, Any] | None = None

    # -- plumbing ------------------------------------------------------------
    def _next_seq(self) -> int:
        s = self._seq
        self._seq = (self._seq + 1) & 0xFF
        return s

    def send(self, op: P.Op, group: int, cmd: int, body: dict[str, Any]) -> int:
        seq = self._next_seq()
        frame = P.encode_request(op, group, cmd, seq, body)
        log.debug("-> %s g%d c%d seq %d %s", op.name, group, cmd, seq, _short(body))
        self.t.send(frame)
        return seq

    def receive(self, timeout: float) -> tuple[P.Header, Any] | None:
        """The next decodable reply, or None after `timeout` seconds of silence."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.t.recv(max(0.0, deadline - time.monotonic()))
            if frame is None:
                return None
            try:
                h, body = P.decode_frame(frame)
                break
            except (ValueError, cbor2.CBORDecodeError) as e:
                log.debug("<- undecodable frame %s: %s", frame.hex(), e)
        log.debug("<- %s g%d c%d seq %d %s", P.Op(h.op).name if h.op < 4 else h.op, h.group, h.cmd, h.seq, _short(body))
        return h, body

    def request(self, op: P.Op, group: int, cmd: int, body: dict[str, Any] | None = None,
                timeout: float | None = None, retries: int | None = None, what: str = "") -> dict[str, Any]:
        """One request/response; retried on silence; raises SMPError on an error reply."""
        body = body or {}
        tries = (self.retries if retries is None else retries) + 1
        wait = self.timeout if timeout is None else timeout
        name = what or f"group {group} command {cmd}"
        for _ in range(tries):
            seq = self.send(op, group, cmd, body)
            deadline = time.monotonic() + wait
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                got = self.receive(left)
                if got is None:
                    break
                h, rbody = got
                if h.seq != seq or h.group != group or h.cmd != cmd or h.op != op + 1:
                    continue  # a late reply to an earlier request
                err = P.error_of(group, rbody)
                if err:
                    raise SMPError(err[0], err[1], err[2], name)
                if not isinstance(rbody, dict):
                    raise ProtocolError(f"{name}: reply is not a CBOR map")
                return rbody
        raise DeviceTimeout(f"{name}: no reply from {self.t.name} after {tries} tries of {wait:g} s")

    # -- connection ----------------------------------------------------------
    def connect(self, negotiate: bool = True) -> None:
        """Read the MCUmgr parameters and, on our devices, the device info; with
        `negotiate`, switch a serial link to the binary framing when offered."""
        try:
            r = self.request(P.Op.READ, P.Group.OS, 6, what="read MCUmgr parameters")
            self.params = DeviceParams(int(r.get("buf_size", 384)), max(1, int(r.get("buf_count", 1))))
        except SMPError:
            self.params = DeviceParams()  # device does not report them: smpclient's defaults
        try:
            self.device_info = self.request(P.Op.READ, P.Group.METEROTA, 0, what="read device info", retries=0)
        except SMPError:
            self.device_info = None  # a standard SMP server: console framing only
            return
        if negotiate and isinstance(self.t, SerialTransport) and "binary" in self.device_info.get("framings", ()):
            self.t.framing = P.Framing.BINARY

    @property
    def max_message(self) -> int:
        size = min(self.params.buf_size, self.t.max_frame)
        if isinstance(self.t, SerialTransport) and self.t.framing is P.Framing.CONSOLE:
            size -= 4  # smpclient's rule: length and CRC share the device's buffer
        return size

    # -- commands ------------------------------------------------------------
    def echo(self, text: str) -> str:
        return str(self.request(P.Op.WRITE, P.Group.OS, 0, {"d": text}, what="echo")["r"])

    def reset(self) -> None:
        self.request(P.Op.WRITE, P.Group.OS, 5, {}, what="reset", retries=0)

    def image_state(self) -> list[dict[str, Any]]:
        return list(self.request(P.Op.READ, P.Group.IMAGE, 0, what="read image state").get("images", []))

    def image_test(self, image_hash: bytes, permanent: bool = False) -> list[dict[str, Any]]:
        r = self.request(P.Op.WRITE, P.Group.IMAGE, 0, {"hash": image_hash, "confirm": permanent},
                         what="mark image for test")
        return list(r.get("images", []))

    def image_confirm(self) -> list[dict[str, Any]]:
        r = self.request(P.Op.WRITE, P.Group.IMAGE, 0, {"confirm": True}, what="confirm running image")
        return list(r.get("images", []))

    def image_erase(self, slot: int = 1) -> None:
        self.request(P.Op.WRITE, P.Group.IMAGE, 5, {"slot": slot}, what="erase slot")

    def info(self) -> dict[str, Any]:
        return self.request(P.Op.READ, P.Group.METEROTA, 0, what="read device info")

    def confirmation(self) -> dict[str, Any]:
        return self.request(P.Op.READ, P.Group.METEROTA, 1, what="read confirmation record")

    def stats(self) -> dict[str, Any]:
        return self.request(P.Op.READ, P.Group.METEROTA, 2, what="read device statistics")

    def os_info(self, fmt: str = "a") -> str:
        return str(self.request(P.Op.READ, P.Group.OS, 7, {"format": fmt}, what="read OS info")["output"])

    # -- upload --------------------------------------------------------------
    def upload(self, data: bytes, *, image: int = 1, upgrade: bool = False, window: int | None = None,
               chunk: int | None = None, progress: Progress | None = None, max_stalls: int = 5,
               _restarts: int = 0) -> UploadStats:
        """Upload `data` to the device's free slot; resumes where the device says."""
        if _restarts > 3:
            raise ProtocolError("upload: the device keeps losing the upload session")
        total = len(data)
        sha = hashlib.sha256(data).digest()
        window = max(1, window if window is not None else self.params.buf_count)
        stats = UploadStats()
        t0 = time.monotonic()
        msg = self.max_message
        first = {"off": 0, "len": total, "sha": sha, "data": b"", "image": image, "upgrade": upgrade}
        first_chunk = min(total, msg - _overhead(first))
        later = chunk or (msg - _overhead({"off": total, "data": b""}))
        if first_chunk <= 0 or later <= 0:
            raise ProtocolError(f"device message size {self.params.buf_size} is too small to upload")
        first["data"] = data[:first_chunk]
        r = self.request(P.Op.WRITE, P.Group.IMAGE, 1, first, timeout=max(self.timeout, 10.0), what="upload")
        acked = _off(r, total)
        stats.resumed_from = acked if acked != first_chunk else 0
        stats.requests = 1
        if acked == total:
            stats.match = r.get("match")
        inflight: dict[int, int] = {}  # seq -> end offset the device should report
        pos = acked
        stalls = 0
        if progress:
            progress(acked, total)
        while acked < total:
            while len(inflight) < window and pos < total:
                if pos == 0:
                    # The device lost the session: off=0 must carry the first-packet fields again.
                    return self._restart_upload(data, image, upgrade, window, chunk, progress, stats, t0, _restarts)
                n = min(later, total - pos)
                seq = self.send(P.Op.WRITE, P.Group.IMAGE, 1, {"off": pos, "data": data[pos:pos + n]})
                inflight[seq] = pos + n
                pos += n
                stats.requests += 1
            got = self.receive(self.timeout)
            if got is None:
                stalls += 1
                stats.timeouts += 1
                if stalls > max_stalls:
                    raise DeviceTimeout(f"upload: device {self.t.name} stopped answering at offset {acked}")
                inflight.clear()
                pos = acked  # resend from what the device confirmed
                continue
            h, body = got
            if h.seq not in inflight or h.group != P.Group.IMAGE or h.cmd != 1:
                continue  # stale: a reply to a request we already gave up on
            stalls = 0
            want = inflight.pop(h.seq)
            err = P.error_of(P.Group.IMAGE, body)
            if err:
                raise SMPError(err[0], err[1], err[2], "upload")
            off = _off(body, total)
            if off == want:
                acked = max(acked, off)
            else:
                # The device expects another offset (a frame was lost or it
                # restarted): its `off` is the truth, rewind to it.
                stats.rewinds += 1
                if off == 0 and acked > 0:
                    return self._restart_upload(data, image, upgrade, window, chunk, progress, stats, t0, _restarts)
                acked = off
                pos = off
                inflight.clear()
            if progress:
                progress(acked, total)
            if acked == total:
                stats.match = body.get("match")
        # Replies still in flight are stale now; they are dropped by seq later.
        stats.bytes = total - stats.resumed_from
        stats.seconds = time.monotonic() - t0
        if stats.match is False:
            raise RefusedError("upload: the device's SHA-256 of the image does not match (match=false)")
        return stats

    def _restart_upload(self, data: bytes, image: int, upgrade: bool, window: int, chunk: int | None,
                        progress: Progress | None, stats: UploadStats, t0: float, restarts: int) -> UploadStats:
        log.info("device lost the upload session; starting again")
        again = self.upload(data, image=image, upgrade=upgrade, window=window, chunk=chunk, progress=progress,
                            _restarts=restarts + 1)
        again.rewinds += stats.rewinds + 1
        again.timeouts += stats.timeouts
        again.seconds = time.monotonic() - t0
        return again


def _overhead(body: dict[str, Any]) -> int:
    # Header + CBOR of the body with empty data, + the data length field
    # growing from 1 byte (empty) to 3 bytes (up to 65535).
    return 8 + len(cbor2.dumps(body, canonical=True)) + 2


def _off(body: dict[str, Any], total: int) -> int:
    off = body.get("off")
    if not isinstance(off, int) or off < 0 or off > total:
        raise ProtocolError(f"upload: device answered an invalid offset {off!r}")
    return off


def _short(body: Any) -> str:
    if isinstance(body, dict):
        return "{" + ", ".join(f"{k}: {('<%d bytes>' % len(v)) if isinstance(v, bytes) and len(v) > 16 else v!r}"
                               for k, v in body.items()) + "}"
    return repr(body)
