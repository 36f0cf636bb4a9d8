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
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import cbor2

from . import protocol as P
from . import rates
from .errors import DeviceTimeout, ProtocolError, RefusedError, TransportError
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
    wire_bytes: int = 0  # image data bytes put on the link (smaller when compressed)
    compressed: bool = False
    compress_why: str = ""  # the rates the choice was made from (rates.choose)


Progress = Callable[[int, int], None]
SECTOR = 4096  # the device's erase unit (device/upload.py): a request that fills one makes it erase
FIRST_SMALL = 512  # bytes of image in the fallback first chunk (upload on a lossy line)


MAX_WAIT = 120.0  # the longest single wait for a reply, backoff included


class SMPClient:
    """Waits follow the link and the device: each wait for a reply is the link's time for the
    request and its reply at the port's rate (Transport.line_time), plus the larger of `timeout`
    and the round trip measured so far (RFC 6298's srtt + 4 rttvar: a slow board, a flash erase
    it does before answering); a retry waits half as long again. So `timeout` is the floor for a fast
    link and a quick device, and defaults hold on a 9600-baud line or a Pico."""

    def __init__(self, transport: Transport, timeout: float = 2.0, retries: int = 3):
        self.t = transport
        self.timeout = timeout
        self.retries = retries
        self._seq = 0
        self._last_sent_ok = False  # the last send() reached the transport
        self.params = DeviceParams()
        self.device_info: dict[str, Any] | None = None
        self._link_bps: float | None = None
        self._srtt: float | None = None
        self._rttvar = 0.0
        self.quiet_flash: bool | None = None  # None: from the device and the port (quiet_on_flash)
        # Tries a reply already answered, whose own replies the device still sends: seq -> until
        # when to wait for them (close() does, so the next client on the port reads none of them).
        self._owed: dict[int, float] = {}

    # -- waits -----------------------------------------------------------------
    def observe_rtt(self, seconds: float) -> None:
        """One measured round trip, the link's own time taken out (the upload loop keeps Karn: only requests that
        were answered on their first send)."""
        r = max(0.0, seconds)
        if self._srtt is None:
            self._srtt, self._rttvar = r, r / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - r)
            self._srtt = 0.875 * self._srtt + 0.125 * r

    @property
    def rto(self) -> float:
        """The measured round trip with its margin (0 before any measurement)."""
        return 0.0 if self._srtt is None else self._srtt + 4 * self._rttvar

    def reply_wait(self, out_bytes: int, in_bytes: int | None = None, floor: float | None = None,
                   attempt: int = 0) -> float:
        """How long to wait for the reply to a request of `out_bytes` (reply of `in_bytes`, by
        default the device's largest message) on its `attempt`-th send."""
        in_bytes = self.max_message if in_bytes is None else in_bytes
        base = max(self.timeout if floor is None else floor, self.rto)
        return min(MAX_WAIT, (base + self.t.line_time(out_bytes) + self.t.line_time(in_bytes)) * (1.5 ** attempt))

    # -- plumbing ------------------------------------------------------------
    def _next_seq(self) -> int:
        s = self._seq
        self._seq = (self._seq + 1) & 0xFF
        return s

    def send(self, op: P.Op, group: int, cmd: int, body: dict[str, Any]) -> int:
        seq = self._next_seq()
        frame = P.encode_request(op, group, cmd, seq, body)
        log.debug("-> %s g%d c%d seq %d %s", op.name, group, cmd, seq, _short(body))
        self._last_sent_ok = False
        self.t.send(frame)
        self._last_sent_ok = True
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
        name = what or f"group {group} command {cmd}"
        out = len(P.encode_request(op, group, cmd, 0, body))
        waits = []
        # Every try is the same request: a reply to an earlier try answers it too. A board slower
        # than the wait (a throttled Pico loading the record code) answered each try after the
        # host had sent the next one, whose reply came too late in turn: no try ever counted.
        # The sequence number tells which try a reply answers, so each reply is a clean round-trip
        # sample (no Karn ambiguity): a board that answers late teaches the waits that follow,
        # instead of drawing a retry of every request and working through the duplicates.
        seqs: dict[int, float] = {}  # seq of each try -> when it was sent
        for attempt in range(tries):
            wait = self.reply_wait(out, floor=timeout, attempt=attempt)
            waits.append(wait)
            sent = time.monotonic()
            seq = self.send(op, group, cmd, body)
            seqs[seq] = sent
            deadline = sent + wait
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                got = self.receive(left)
                if got is None:
                    break
                h, rbody = got
                if h.seq not in seqs or h.group != group or h.cmd != cmd or h.op != op + 1:
                    self._owed.pop(h.seq, None)
                    continue  # a late reply to an earlier request
                self.observe_rtt(time.monotonic() - seqs[h.seq] - self.t.line_time(out)
                                 - self.t.line_time(len(cbor2.dumps(rbody)) + 8))
                # The board answers every try, one after the other: the j-th still owed comes
                # within j of the waits it has just taught.
                now, wait = time.monotonic(), self.reply_wait(out, floor=timeout)
                later = [q for q in seqs if q != h.seq]
                self._owed.update((q, now + (j + 1) * wait) for j, q in enumerate(later))
                err = P.error_of(group, rbody)
                if err:
                    raise SMPError(err[0], err[1], err[2], name)
                if not isinstance(rbody, dict):
                    raise ProtocolError(f"{name}: reply is not a CBOR map")
                return rbody
        raise DeviceTimeout(f"{name}: no reply from {self.t.name} after {tries} tries "
                            f"(waited {', '.join(f'{w:.3g}' for w in waits)} s)")

    def settle(self) -> int:
        """Read the replies still owed for tries that an earlier reply already answered (a slow
        board answers every try), until they came or their wait ran out: a port left with them
        in flight hands them to the next client, and smpmgr fails on the first with "Bad
        sequence" (make hil-sim: a state read retried on the Pico, then smpmgr's confirm).
        Returns how many came."""
        came = 0
        while self._owed:
            left = max(self._owed.values()) - time.monotonic()
            if left <= 0:
                break
            got = self.receive(left)
            if got is None:
                break
            if self._owed.pop(got[0].seq, None) is not None:
                came += 1
        self._owed.clear()
        return came

    def close(self) -> None:
        """settle(), then close the transport."""
        try:
            self.settle()
        finally:
            self.t.close()

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
            self.device_info = self.request(P.Op.READ, P.Group.METEROTA, 0, what="read device info")
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
        """Ask for a reset (one try: a second one could reset the next boot). A USB CDC port goes
        with its board: once the request has left, a port that fails is the reset under way."""
        try:
            self.request(P.Op.WRITE, P.Group.OS, 5, {}, what="reset", retries=0)
        except TransportError:
            if not self._last_sent_ok:  # the request never left: a port that is not there
                raise

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
    @property
    def can_deflate(self) -> bool:
        return bool(self.device_info and "deflate" in self.device_info.get("features", ()))

    def upload(self, data: bytes, *, image: int = 1, upgrade: bool = False, window: int | None = None,
               chunk: int | None = None, progress: Progress | None = None, max_stalls: int | None = None,
               compress: bool | None = None, target: tuple[int, int] = (P.Group.IMAGE, 1)) -> UploadStats:
        """Upload `data` to the device's free slot; resumes where the device says.

        compress: None = when the device offers it (meterota's group 64 upload of
        raw-deflate blocks with a 512-byte window), True = require it, False = never.
        target: the (group, command) of the plain upload; another one than the
        image group's (a concentrator's image store) uploads uncompressed.
        max_stalls: silent waits in a row the upload resends through (from the device's
        last offset, each wait 1.5 x the one before); by default the client's retries + 2
        (5 with the default 3), so that fewer retries also give up on a dead line sooner."""
        if max_stalls is None:
            max_stalls = self.retries + 2
        why = ""
        probe: _Probe | None = None
        if target != (P.Group.IMAGE, 1):
            compress = False
        elif compress is None:
            # Worth it only where the link is slower than the board inflates (rates.choose).
            if not self.can_deflate:
                compress = False
            elif len(data) >= rates.PROBE_MIN:
                # The upload's own requests tell (a raw stretch, then a deflate stretch, timed),
                # not echoes that miss the board's work per request, nor a UART's baud rate
                # alone (a slow board inflates slower than 115200 baud brings: the simulated
                # ESP32 on a UART, 6.4 kB/s raw against 3.5 deflated).
                probe = _Probe()
                compress = False
            else:
                choice = self.choose_compression(data)
                compress, why = choice.compress, choice.why
                log.info("upload %s: %s", "compressed" if compress else "raw", why)
        elif compress and not self.can_deflate:
            raise RefusedError("upload: the device does not take compressed uploads")
        plan = _Plan(data, self.max_message, image, upgrade, chunk, compress, target)
        plan.probe = probe
        stats = UploadStats(compressed=compress, compress_why=why)
        t0 = time.monotonic()
        for _ in range(4):
            if self._upload_session(plan, max(1, window or self.params.buf_count), progress, max_stalls, stats):
                break
            log.info("device lost the upload session; starting again")
            stats.rewinds += 1
        else:
            raise ProtocolError("upload: the device keeps losing the upload session")
        if probe is not None:
            stats.compressed = probe.compress
            stats.compress_why = probe.why or "timed requests: the upload ended before the probe did (a resumed one)"
        stats.bytes = len(data) - stats.resumed_from
        stats.wire_bytes = plan.wire
        stats.seconds = time.monotonic() - t0
        if stats.match is False:
            raise RefusedError("upload: the device's SHA-256 of the image does not match (match=false)")
        return stats

    def _uart_prior(self) -> float | None:
        """A UART's baud / 10 when the port is one (by its name), else None."""
        return rates.uart_rate(self.t.port, self.t.baudrate) if isinstance(self.t, SerialTransport) else None

    def link_rate(self) -> float:
        """Bytes/s the link carries: a UART's baud / 10 when the port is one, else
        measured with echo round trips of two sizes (cached for this client)."""
        if self._link_bps is None:
            r = self._uart_prior()
            self._link_bps = r if r is not None else self._probe_link()
        return self._link_bps

    def _probe_link(self) -> float:
        """Echo round trips, each sent once (a lost one ends the probe instead of
        waiting out retries). When one is lost, what the transport says: a serial
        port's set baud / 10 (for a USB CDC port or a pty a guess on the slow side,
        as a link that loses frames deserves), UDP unmeasured (inf)."""
        small, big = 16, max(64, min(1024, self.max_message - 64))
        ts: dict[int, list[float]] = {small: [], big: []}

        def echo(n: int) -> None:
            t0 = time.perf_counter()
            self.request(P.Op.WRITE, P.Group.OS, 0, {"d": "x" * n}, timeout=min(self.timeout, 1.0), retries=0,
                         what="echo (link probe)")
            ts[n].append(time.perf_counter() - t0)

        try:
            for _ in range(3):
                echo(small)
            echo(big)
            if ts[big][0] - min(ts[small]) < 0.02:  # a fast link: more samples to see past scheduling noise
                for _ in range(3):
                    echo(big)
                    echo(small)
        except (DeviceTimeout, SMPError) as e:
            # A link that loses frames: fewer bytes on it lose fewer frames.
            log.info("link probe: %s", e)
            return self.t.baudrate / 10 if isinstance(self.t, SerialTransport) else float("inf")
        return rates.link_rate_from_echoes(ts[small], ts[big], small, big)

    def quiet_on_flash(self) -> bool:
        """Whether the link loses bytes while the board writes flash: a UART without flow
        control, by the device's word (info uart_fifo: its hardware FIFO, all that is kept
        while interrupts are off) or by the port's name (a USB-serial bridge, a SoC UART)."""
        if self.quiet_flash is not None:
            return self.quiet_flash
        if int((self.device_info or {}).get("uart_fifo") or 0) > 0:
            return True
        return isinstance(self.t, SerialTransport) and rates.uart_rate(self.t.port, self.t.baudrate) is not None

    def inflate_rate(self) -> float:
        """Raw bytes/s the device inflates at: its own measurement once it has
        inflated something since boot, else its board's measured figure."""
        info = self.device_info or {}
        measured = info.get("inflate_bps")
        if isinstance(measured, (int, float)) and measured > 0:
            return float(measured)
        return float(rates.BOARD_INFLATE_BPS.get(str(info.get("board")), rates.UNKNOWN_BOARD_INFLATE_BPS))

    def choose_compression(self, data: bytes) -> rates.Choice:
        return rates.choose(self.link_rate(), self.inflate_rate(), self._sample(data))

    def _sample(self, data: bytes, blocks: int = 8) -> rates.Sample:
        """Compressed requests for `blocks` places spread over `data`, prepared as the
        upload would: the image's ratio on the link and this host's speed at it."""
        plan = _Plan(data, self.max_message, 1, False, None, True)
        step = max(_Plan.DEFLATE_BLOCK, len(data) // blocks // _Plan.DEFLATE_BLOCK * _Plan.DEFLATE_BLOCK)
        raw = wire = 0
        t0 = time.perf_counter()
        for pos in range(0, len(data), step):
            _g, _c, body, end = plan.request(pos)
            raw += end - pos
            wire += len(body["data"])
        dt = max(time.perf_counter() - t0, 1e-9)
        return rates.Sample(min(1.0, wire / raw) if raw else 1.0, raw / dt if raw else float("inf"))

    def _upload_session(self, plan: "_Plan", window: int, progress: Progress | None, max_stalls: int,
                        stats: UploadStats) -> bool:
        """One session from off=0; False when the device dropped it (start again)."""
        total = plan.total
        group, cmd, body, first_end = plan.request(0)
        try:
            r = self.request(P.Op.WRITE, group, cmd, body, what="upload", retries=min(1, self.retries))
        except DeviceTimeout:
            if self.retries <= 1:
                raise
            # A line that loses frames: a small first chunk (the header and a little) gets the
            # session open where a full message keeps being hit; the rest follows as usual.
            log.info("upload: no reply to the first chunk; trying a small one")
            group, cmd = plan.target
            body = {**plan.first, "data": plan.data[:min(total, FIRST_SMALL)]}
            first_end = len(body["data"])
            r = self.request(P.Op.WRITE, group, cmd, body, what="upload", retries=self.retries - 2)
        acked = _off(r, total)
        stats.resumed_from = acked if acked != first_end else 0
        stats.requests += 1
        if acked == total:
            stats.match = r.get("match")
        inflight: dict[int, tuple[int, int, int]] = {}  # seq -> (end offset, group, cmd)
        sent_at: dict[int, float] = {}  # seq -> when sent, for requests sent once (Karn)
        pos = acked
        stalls = 0
        # On a UART without flow control the board loses what arrives beyond its FIFO while it
        # erases and programs a sector (interrupts off): after a request that fills a sector,
        # send nothing until it is answered, so the line is quiet during the stall.
        quiet = self.quiet_on_flash()
        barrier: int | None = None  # seq of the sector-filling request in flight
        modes: dict[int, tuple[int, bool]] = {}  # seq -> (offset, deflated), for the rate probe
        if progress:
            progress(acked, total)
        while acked < total:
            while len(inflight) < window and pos < total and (barrier is None or barrier not in inflight):
                if pos == 0:
                    return False  # off=0 must carry the first-packet fields again
                if plan.probe is not None:
                    plan.probe.sending(plan, pos)
                group, cmd, body, end = plan.request(pos)
                seq = self.send(P.Op.WRITE, group, cmd, body)
                inflight[seq] = (end, group, cmd)
                modes[seq] = (pos, plan.compress)
                if not stalls:
                    sent_at[seq] = time.monotonic()
                if quiet and (end // SECTOR > pos // SECTOR or end == total):
                    barrier = seq
                pos = end
                stats.requests += 1
            # Every request in flight crosses the link before the last reply can come back.
            got = self.receive(self.reply_wait(plan.msg * len(inflight), 32 * len(inflight), attempt=stalls))
            if got is None:
                if plan.probe is not None:
                    plan.probe.disturbed(plan)
                stalls += 1
                stats.timeouts += 1
                if stalls > max_stalls:
                    raise DeviceTimeout(f"upload: device {self.t.name} stopped answering at offset {acked} "
                                        f"({stalls} silent waits in a row)")
                inflight.clear()
                sent_at.clear()
                pos = acked  # resend from what the device confirmed
                continue
            h, rbody = got
            sent = inflight.get(h.seq)
            if sent is None or h.group != sent[1] or h.cmd != sent[2]:
                continue  # stale: a reply to a request we already gave up on
            stalls = 0
            del inflight[h.seq]
            t_sent = sent_at.pop(h.seq, None)
            if t_sent is not None:
                # Queued behind the others in flight: a conservative sample.
                self.observe_rtt(time.monotonic() - t_sent - self.t.line_time(plan.msg))
            err = P.error_of(h.group, rbody)
            if err:
                raise SMPError(err[0], err[1], err[2], "upload")
            off = _off(rbody, total)
            if off == sent[0]:
                acked = max(acked, off)
                m = modes.pop(h.seq, None)
                if plan.probe is not None and m is not None:
                    plan.probe.acked(plan, m[0], off, m[1], acked)
            else:
                # The device expects another offset (a frame was lost or it
                # restarted): its `off` is the truth, rewind to it.
                if plan.probe is not None:
                    plan.probe.disturbed(plan)
                stats.rewinds += 1
                if off == 0 and acked > 0:
                    return False
                acked = off
                pos = off
                inflight.clear()
            if progress:
                progress(acked, total)
            if acked == total:
                stats.match = rbody.get("match")
        # Replies still in flight are stale now; they are dropped by seq later.
        return True


class _Probe:
    """Compression chosen from the upload's own requests (images of rates.PROBE_MIN or more): after the
    first chunk, a raw stretch of rates.PROBE_BYTES, then a deflate stretch as long, each timed
    from the reply to its first request to the reply to its last, pipeline full; the rest goes
    the faster way (deflate only when it beats raw by rates.PROBE_MARGIN). These requests carry
    everything the board does per request (deframing, CBOR, hashing, flash, inflating), which
    echoes do not."""

    def __init__(self) -> None:
        self.start: int | None = None  # offset the raw stretch starts at
        self.compress = False
        self.why = ""
        self.done = False
        self.restarts = 0
        self.acks: dict[bool, list[tuple[float, int]]] = {False: [], True: []}  # deflated -> (t, raw bytes)

    def sending(self, plan: "_Plan", pos: int) -> None:
        if self.done:
            return
        if self.start is None:
            self.start = pos
        if not plan.compress and pos >= self.start + rates.PROBE_BYTES:
            plan.set_compress(True)  # the deflate stretch

    def acked(self, plan: "_Plan", pos: int, end: int, deflated: bool, acked: int) -> None:
        if self.done or self.start is None:
            return
        self.acks[deflated].append((time.monotonic(), end - pos))
        if deflated and acked >= self.start + 2 * rates.PROBE_BYTES:
            raw, dfl = rates.stretch_rate(self.acks[False]), rates.stretch_rate(self.acks[True])
            if raw is None or dfl is None:
                return
            self._decide(plan, dfl > rates.PROBE_MARGIN * raw,
                         f"timed requests: raw {raw / 1000:.1f} kB/s, deflate {dfl / 1000:.1f} kB/s of image")

    def disturbed(self, plan: "_Plan") -> None:
        """A timeout or a rewind: the stretches' times mean nothing; start them again from the
        next request, twice at most, then deflate (fewer bytes on a line that loses frames lose
        fewer frames, as the echo probe decides when an echo is lost)."""
        if self.done:
            return
        self.restarts += 1
        self.acks = {False: [], True: []}
        self.start = None
        if self.restarts > 2:
            self._decide(plan, True, "timed requests: frames lost three times during the probe, "
                                     "compressing a lossy link")
        else:
            plan.set_compress(False)

    def _decide(self, plan: "_Plan", compress: bool, why: str) -> None:
        self.done = True
        self.compress, self.why = compress, why
        plan.set_compress(compress)
        log.info("upload %s: %s", "compressed" if compress else "raw", why)


class _Plan:
    """The upload request for any offset: plain chunks in the image group, or
    raw-deflate blocks in meterota's group when compressing (a block that does
    not shrink enough goes plain)."""

    DEFLATE_BLOCK = 4096  # device/grp_image.py DEFLATE_BLOCK
    DEFLATE_WBITS = 9

    def __init__(self, data: bytes, msg: int, image: int, upgrade: bool, chunk: int | None, compress: bool,
                 target: tuple[int, int] = (P.Group.IMAGE, 1)):
        self.target = target
        self.data = data
        self.total = len(data)
        self.msg = msg
        self.compress = compress
        self.first = {"off": 0, "len": self.total, "sha": hashlib.sha256(data).digest(), "image": image,
                      "upgrade": upgrade}
        self.plain_first = min(self.total, msg - _overhead({**self.first, "data": b""}))
        self.plain = chunk or (msg - _overhead({"off": self.total, "data": b""}))
        if self.plain_first <= 0 or self.plain <= 0:
            raise ProtocolError(f"device message size {msg} is too small to upload")
        self.wire = 0
        self._cache: dict[int, tuple[int, int, dict[str, Any], int]] = {}
        self.probe: _Probe | None = None

    def set_compress(self, compress: bool) -> None:
        if compress != self.compress:
            self.compress = compress
            self._cache = {}

    def request(self, pos: int) -> tuple[int, int, dict[str, Any], int]:
        r = self._cache.get(pos)
        if r is None:
            r = self._deflated(pos) if self.compress else None
            if r is None:
                n = min(self.plain_first if pos == 0 else self.plain, self.total - pos)
                body = {**self.first, "data": self.data[:n]} if pos == 0 else {"off": pos, "data": self.data[pos:pos + n]}
                r = (self.target[0], self.target[1], body, pos + n)
            self._cache = {pos: r}  # offsets only move forward between rewinds
        self.wire += len(r[2]["data"])
        return r

    def _deflated(self, pos: int) -> tuple[int, int, dict[str, Any], int] | None:
        base = {**self.first} if pos == 0 else {"off": pos}
        # A block never crosses a 4 KiB sector of the image: the device inflates it
        # straight into its sector buffer (one that crosses costs it a buffer).
        n = min(self.DEFLATE_BLOCK - pos % self.DEFLATE_BLOCK, self.total - pos)
        while n >= 256:
            c = zlib.compressobj(9, zlib.DEFLATED, -self.DEFLATE_WBITS)
            z = c.compress(self.data[pos:pos + n]) + c.flush()
            body = {**base, "rlen": n, "data": z}
            if 8 + len(cbor2.dumps(body, canonical=True)) <= self.msg:
                # Worth it only when it beats a plain chunk of the same message.
                return (P.Group.METEROTA, 3, body, pos + n) if len(z) < n * 0.9 else None
            n //= 2
        return None


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
