"""Fault injection between a host and a (simulated) device.

Serial faults are :class:`~meterota.lab.sim.LinkShaper` subclasses for the simulator's pty bridge
(``SimDevice(..., shaper=...)``); each gets every chunk the bridge reads and returns the bytes to
forward. UDP faults come from :class:`UDPFaultProxy`, a small datagram relay that a client talks
to instead of the device.

Every injector is deterministic for a given seed and byte stream (faults are placed by absolute
byte offset, not by chunk, unless a chunk schedule is asked for), stops after ``max_faults`` faults
so that a run always terminates, counts what it did (``stats()``), and has an ``enabled`` flag so a
test can switch it off and run a clean client against the same device.

Serial fault kinds (``FAULT_KINDS`` maps the short names to the classes):

* :class:`DropBytes`      -- bytes vanish (``span`` bytes per fault);
* :class:`CorruptBytes`   -- bits flip (``bits`` bits of one byte per fault);
* :class:`DuplicateBytes` -- a run of ``span`` bytes arrives twice;
* :class:`InsertGarbage`  -- 1..``max_len`` random bytes appear (optionally starting with a frame
  marker, or as a fake binary-frame header with a valid check byte);
* :class:`StallLine`      -- once, at a byte count, the line stops for ``seconds``;
* :class:`CutFrame`       -- once, ``after`` bytes into a frame, the rest of that frame is lost;
* :class:`LoseFrames`     -- whole SMP frames whose header matches a predicate are lost (targeted).

About the stall: the shaper hook is called only when the bridge has read a chunk, so a shaper
cannot release held bytes at a chosen time by itself. ``StallLine`` therefore offers three modes:
``"hold"`` keeps everything from the trigger on and releases it with the first chunk that arrives
after the deadline (bytes are late, not lost; if nothing more ever comes in that direction they
stay held), ``"drop"`` drops everything until the deadline (a cable pulled for a while), and
``"freeze"`` blocks the bridge thread for ``seconds`` (a truly stalled line: both directions stop,
nothing is lost, the pty and socket buffers fill). An exact timed release would need a bridge hook
such as ``LinkShaper.deadline() -> float | None`` consulted in the bridge's select timeout plus
``LinkShaper.poll(now) -> tuple[bytes, bytes]`` called on every wake-up.
"""

from __future__ import annotations

import math
import random
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .sim import UDP_PORT, LinkShaper, _claim_udp, _release_udp

__all__ = [
    "DIRECTIONS",
    "FAULT_KINDS",
    "FaultShaper",
    "ByteFault",
    "DropBytes",
    "CorruptBytes",
    "DuplicateBytes",
    "InsertGarbage",
    "StallLine",
    "CutFrame",
    "LoseFrames",
    "UDPFaultProxy",
    "make_shaper",
]

Direction = Literal["to_device", "to_host", "both"]
DIRECTIONS: tuple[str, str] = ("to_device", "to_host")

_MAX_EVENTS = 200  # events kept for diagnostics; counters keep counting past this


def _dirs(direction: str) -> tuple[str, ...]:
    if direction == "both":
        return DIRECTIONS
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'to_device', 'to_host' or 'both', not {direction!r}")
    return (direction,)


class FaultShaper(LinkShaper):
    """Base of the serial fault injectors: direction selection, the fault budget, counters.

    Subclasses implement ``_apply(direction, data, pos)`` (``pos``: offset of ``data`` in that
    direction's byte stream) and call ``_take(direction, pos, what)`` for each fault they inject;
    it returns False once the budget is spent.
    """

    kind = "none"

    def __init__(self, *, direction: Direction = "to_device", seed: int = 0, max_faults: int | None = 10,
                 enabled: bool = True) -> None:
        self.direction = direction
        self.dirs = _dirs(direction)
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_faults = max_faults
        self.enabled = enabled
        self.injected = {d: 0 for d in DIRECTIONS}
        self.bytes_in = {d: 0 for d in DIRECTIONS}
        self.bytes_out = {d: 0 for d in DIRECTIONS}
        self.events: list[tuple[str, int, str]] = []
        self._lock = threading.Lock()

    # -- LinkShaper --------------------------------------------------------------------------
    def to_device(self, data: bytes) -> bytes:
        return self._shape("to_device", data)

    def to_host(self, data: bytes) -> bytes:
        return self._shape("to_host", data)

    def _shape(self, d: str, data: bytes) -> bytes:
        pos = self.bytes_in[d]
        self.bytes_in[d] += len(data)
        if self.enabled and d in self.dirs:
            data = self._apply(d, bytes(data), pos)
        else:
            data = self._bypass(d, data, pos)
        self.bytes_out[d] += len(data)
        return data

    # -- for subclasses ----------------------------------------------------------------------
    def _apply(self, d: str, data: bytes, pos: int) -> bytes:
        return data

    def _bypass(self, d: str, data: bytes, pos: int) -> bytes:
        """Pass-through while disabled (or in a direction not faulted); hook for state tracking."""
        return data

    @property
    def faults(self) -> int:
        """Total faults injected, both directions."""
        return sum(self.injected.values())

    @property
    def exhausted(self) -> bool:
        return self.max_faults is not None and self.faults >= self.max_faults

    def _take(self, d: str, pos: int, what: str) -> bool:
        if self.exhausted:
            return False
        with self._lock:
            self.injected[d] += 1
            if len(self.events) < _MAX_EVENTS:
                self.events.append((d, pos, what))
        return True

    def stats(self) -> dict[str, Any]:
        """Counters: faults per direction, bytes in/out per direction, the first events."""
        with self._lock:
            return {
                "kind": self.kind,
                "direction": self.direction,
                "seed": self.seed,
                "faults": self.faults,
                "max_faults": self.max_faults,
                "injected": dict(self.injected),
                "bytes_in": dict(self.bytes_in),
                "bytes_out": dict(self.bytes_out),
                "events": list(self.events),
            }

    def describe(self) -> str:
        return f"{self.kind} {self.direction}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()} faults={self.faults}/{self.max_faults}>"


class ByteFault(FaultShaper):
    """A fault at chosen byte offsets; one schedule of:

    * ``every=N``: about one fault per N bytes (gaps drawn uniformly from [N/2, 3N/2]);
    * ``p=P``: each byte independently with probability P (geometric gaps);
    * ``every_chunk=N``: one fault at a random byte of every N-th chunk (depends on how the
      bridge happens to chunk the stream, so less reproducible).

    ``start`` bytes of each direction pass untouched first (e.g. to let the connection set up).
    """

    def __init__(self, *, every: int | None = None, p: float | None = None, every_chunk: int | None = None,
                 start: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        if sum(x is not None for x in (every, p, every_chunk)) != 1:
            raise ValueError("give exactly one of every=, p=, every_chunk=")
        if every is not None and every < 1:
            raise ValueError("every must be >= 1")
        if p is not None and not 0 < p <= 1:
            raise ValueError("p must be in (0, 1]")
        if every_chunk is not None and every_chunk < 1:
            raise ValueError("every_chunk must be >= 1")
        self.every = every
        self.p = p
        self.every_chunk = every_chunk
        self.start = start
        self._chunks = {d: 0 for d in DIRECTIONS}
        self._next = {d: start + self._gap() for d in DIRECTIONS}

    def _gap(self) -> int:
        if self.every is not None:
            return max(1, self.rng.randint(self.every // 2, self.every * 3 // 2))
        if self.p is not None:
            if self.p >= 1:
                return 1
            u = self.rng.random()
            return 1 + int(math.log(1.0 - u) / math.log(1.0 - self.p))
        return 0

    def _positions(self, d: str, data: bytes, pos: int) -> list[int]:
        if self.every_chunk is not None:
            self._chunks[d] += 1
            if self._chunks[d] % self.every_chunk or pos + len(data) <= self.start:
                return []
            return [max(self.start - pos, 0) + self.rng.randrange(len(data) - max(self.start - pos, 0))]
        out = []
        end = pos + len(data)
        while self._next[d] < pos:  # skipped while disabled
            self._next[d] += self._gap()
        while self._next[d] < end:
            out.append(self._next[d] - pos)
            self._next[d] += self._gap()
        return out

    def _apply(self, d: str, data: bytes, pos: int) -> bytes:
        idx = self._positions(d, data, pos)
        if not idx:
            return data
        out = bytearray()
        last = 0
        for i in idx:
            if i < last:
                continue  # inside the span of the previous fault
            if not self._take(d, pos + i, self.kind):
                break
            out += data[last:i]
            repl, used = self._fault(data, i)
            out += repl
            last = i + used
        out += data[last:]
        return bytes(out)

    def _fault(self, data: bytes, i: int) -> tuple[bytes, int]:
        """(replacement, bytes of data it replaces) for a fault at data[i]."""
        raise NotImplementedError

    def describe(self) -> str:
        if self.every is not None:
            sched = f"1/{self.every} B"
        elif self.p is not None:
            sched = f"p={self.p:g}/B"
        else:
            sched = f"every {self.every_chunk} chunks"
        return f"{self.kind} {self.direction} {sched} cap {self.max_faults}"


class DropBytes(ByteFault):
    """``span`` consecutive bytes are lost per fault."""

    kind = "drop"

    def __init__(self, *, span: int = 1, **kw: Any) -> None:
        super().__init__(**kw)
        self.span = max(1, span)

    def _fault(self, data: bytes, i: int) -> tuple[bytes, int]:
        return b"", min(self.span, len(data) - i)


class CorruptBytes(ByteFault):
    """``bits`` distinct bits of one byte flip per fault."""

    kind = "corrupt"

    def __init__(self, *, bits: int = 1, **kw: Any) -> None:
        super().__init__(**kw)
        if not 1 <= bits <= 8:
            raise ValueError("bits must be 1..8")
        self.bits = bits

    def _fault(self, data: bytes, i: int) -> tuple[bytes, int]:
        mask = 0
        for b in self.rng.sample(range(8), self.bits):
            mask |= 1 << b
        return bytes([data[i] ^ mask]), 1


class DuplicateBytes(ByteFault):
    """A run of ``span`` bytes is delivered twice."""

    kind = "dup"

    def __init__(self, *, span: int = 1, **kw: Any) -> None:
        super().__init__(**kw)
        self.span = max(1, span)

    def _fault(self, data: bytes, i: int) -> tuple[bytes, int]:
        run = data[i:i + self.span]
        return run + run, len(run)


class InsertGarbage(ByteFault):
    """1..``max_len`` random bytes appear before a byte.

    ``markers`` (probability) starts the garbage with something a deframer reacts to (06 09,
    06 0B, 04 14 or a newline); ``fake_header`` (probability) makes it a complete binary-frame
    header ``06 0B len_hi len_lo check`` with a valid check byte and a random length up to
    ``fake_max_len``: what line noise produces once in 256 binary-looking starts.
    """

    kind = "garbage"

    def __init__(self, *, max_len: int = 8, markers: float = 0.5, fake_header: float = 0.0,
                 fake_max_len: int = 65535, **kw: Any) -> None:
        super().__init__(**kw)
        self.max_len = max(1, max_len)
        self.markers = markers
        self.fake_header = fake_header
        self.fake_max_len = max(8, min(fake_max_len, 65535))

    def _fault(self, data: bytes, i: int) -> tuple[bytes, int]:
        rng = self.rng
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, self.max_len)))
        r = rng.random()
        if r < self.fake_header:
            n = rng.randint(8, self.fake_max_len)
            junk = bytes([0x06, 0x0B, n >> 8, n & 0xFF, (~((n >> 8) + (n & 0xFF))) & 0xFF]) + junk
        elif r < self.fake_header + self.markers:
            junk = rng.choice((b"\x06\x09", b"\x06\x0b", b"\x04\x14", b"\n")) + junk
        return junk, 0


class StallLine(FaultShaper):
    """Once, when ``at`` bytes have passed in a faulted direction, the line stalls for ``seconds``.

    ``mode``: ``"hold"`` (bytes held, released late with the first chunk after the deadline),
    ``"drop"`` (bytes dropped until the deadline) or ``"freeze"`` (the bridge thread sleeps
    ``seconds``: both directions stop, nothing is lost). See the module docstring. ``clock`` is the
    time source of the deadline (``time.monotonic``; tests may pass their own).
    """

    kind = "stall"

    def __init__(self, *, at: int = 4096, seconds: float = 1.0, mode: str = "hold",
                 clock: Callable[[], float] = time.monotonic, **kw: Any) -> None:
        kw.setdefault("max_faults", 1)
        super().__init__(**kw)
        if mode not in ("hold", "drop", "freeze"):
            raise ValueError("mode must be 'hold', 'drop' or 'freeze'")
        self.at = at
        self.seconds = seconds
        self.mode = mode
        self.clock = clock
        self.deadline: float | None = None
        self.held = {d: bytearray() for d in DIRECTIONS}
        self.released = {d: 0 for d in DIRECTIONS}
        self.dropped = {d: 0 for d in DIRECTIONS}

    def _apply(self, d: str, data: bytes, pos: int) -> bytes:
        now = self.clock()
        if self.deadline is None:
            if pos + len(data) <= self.at or not self._take(d, self.at, f"stall {self.mode} {self.seconds:g}s"):
                return data
            self.deadline = now + self.seconds
            k = max(0, self.at - pos)
            if self.mode == "freeze":
                time.sleep(self.seconds)  # the bridge thread itself stops: a frozen line
                self.deadline = 0.0
                return data
            head, data = data[:k], data[k:]
            return head + self._during(d, data, now)
        return self._during(d, data, now)

    def _bypass(self, d: str, data: bytes, pos: int) -> bytes:
        # Switched off mid-stall: what was held goes out now.
        if self.held[d]:
            data = bytes(self.held[d]) + data
            self.released[d] += len(self.held[d])
            self.held[d].clear()
        return data

    def _during(self, d: str, data: bytes, now: float) -> bytes:
        if self.deadline is None or self.mode == "freeze":
            return data
        if now < self.deadline:
            if self.mode == "hold":
                self.held[d] += data
            else:
                self.dropped[d] += len(data)
            return b""
        out = bytes(self.held[d]) + data
        self.released[d] += len(self.held[d])
        self.held[d].clear()
        return out

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s.update(mode=self.mode, seconds=self.seconds, at=self.at, held=sum(len(h) for h in self.held.values()),
                 released=dict(self.released), dropped=dict(self.dropped))
        return s

    def describe(self) -> str:
        return f"stall {self.mode} {self.seconds:g}s at {self.at} B {self.direction}"


@dataclass
class _FrameState:
    index: int = -1  # frames seen in this direction
    in_frame: bool = False
    pos: int = 0  # bytes of the current frame seen so far
    hdr: bytearray = field(default_factory=bytearray)
    kind: str | None = None  # "binary" | "console" once known
    length: int | None = None  # binary: whole frame length incl. header and CRC
    cut: bool = False  # this frame is being cut
    cut_counted: bool = False


class CutFrame(FaultShaper):
    """The rest of a frame is lost ``after`` bytes into it (a line cut mid-frame).

    Frames are tracked in both SMP serial framings: a binary frame's length comes from its header,
    a console packet runs until the next 0x06 (base64 text never contains it). The first frame cut
    is frame number ``first`` (0-based, counted per direction since the shaper was made), then
    every ``every``-th frame, until ``max_faults`` cuts (default 1: once). A frame that ends before
    ``after`` bytes is not cut; the next frame is tried instead.
    """

    kind = "cut"

    def __init__(self, *, after: int = 64, first: int = 10, every: int = 1, **kw: Any) -> None:
        kw.setdefault("max_faults", 1)
        super().__init__(**kw)
        self.after = max(1, after)
        self.first = first
        self.every = max(1, every)
        self.frames = {d: _FrameState() for d in DIRECTIONS}
        self.cut_bytes = {d: 0 for d in DIRECTIONS}
        self._owed = False  # a chosen frame ended before `after`: cut the next one

    def _bypass(self, d: str, data: bytes, pos: int) -> bytes:
        self._track(d, bytes(data), pos, cutting=False)
        return data

    def _apply(self, d: str, data: bytes, pos: int) -> bytes:
        return self._track(d, data, pos, cutting=True)

    def _start_frame(self, st: _FrameState, cutting: bool) -> None:
        st.index += 1
        st.in_frame = True
        st.pos = 0
        st.hdr = bytearray()
        st.kind = None
        st.length = None
        st.cut_counted = False
        st.cut = (cutting and not self.exhausted and st.index >= self.first
                  and (st.index - self.first) % self.every == 0)
        if cutting and not st.cut and st.index >= self.first and not self.exhausted and self._owed:
            st.cut = True  # an earlier chosen frame ended too soon: cut this one instead
        if st.cut:
            self._owed = False

    def _track(self, d: str, data: bytes, pos: int, cutting: bool) -> bytes:
        st = self.frames[d]
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            if not st.in_frame:
                j = data.find(b"\x06", i)
                if j < 0:
                    out += data[i:]
                    break
                out += data[i:j]
                i = j
                self._start_frame(st, cutting)
                continue
            if st.kind is None or (st.kind == "binary" and st.length is None):
                # Header bytes, one at a time (at most 5 per frame).
                b = data[i]
                st.hdr.append(b)
                self._emit(d, st, pos + i, data[i:i + 1], out)
                st.pos += 1
                i += 1
                if len(st.hdr) == 2:
                    st.kind = "binary" if b == 0x0B else "console" if b == 0x09 else None
                    if st.kind is None:  # a stray 0x06: not a frame
                        self._end_frame(st)
                elif len(st.hdr) == 5 and st.kind == "binary":
                    hi, lo, chk = st.hdr[2], st.hdr[3], st.hdr[4]
                    if chk != (~(hi + lo)) & 0xFF:
                        self._end_frame(st)
                    else:
                        st.length = 5 + ((hi << 8) | lo) + 2
                continue
            if st.kind == "binary":
                assert st.length is not None
                k = min(st.length - st.pos, n - i)
                ends = st.pos + k == st.length
            else:
                j = data.find(b"\x06", i)
                k = (j - i) if j >= 0 else n - i
                ends = j >= 0
            self._emit(d, st, pos + i, data[i:i + k], out)
            st.pos += k
            i += k
            if ends:
                self._end_frame(st)
        return bytes(out)

    def _emit(self, d: str, st: _FrameState, at: int, seg: bytes, out: bytearray) -> None:
        if not st.cut:
            out += seg
            return
        keep = max(0, min(len(seg), self.after - st.pos))
        out += seg[:keep]
        lost = len(seg) - keep
        if lost:
            if not st.cut_counted:
                if not self._take(d, at + keep, f"cut frame {st.index} after {self.after} B"):
                    st.cut = False
                    out += seg[keep:]
                    return
                st.cut_counted = True
            self.cut_bytes[d] += lost

    def _end_frame(self, st: _FrameState) -> None:
        if st.cut and not st.cut_counted:
            self._owed = True  # too short to cut at `after`: take the next frame
        st.in_frame = False
        st.cut = False

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s.update(after=self.after, first=self.first, frames={d: f.index + 1 for d, f in self.frames.items()},
                 cut_bytes=dict(self.cut_bytes))
        return s

    def describe(self) -> str:
        return f"cut after {self.after} B of frame {self.first} {self.direction}"


class LoseFrames(FaultShaper):
    """Whole SMP frames whose header matches ``match`` are lost (a targeted fault, e.g. "the
    reply to reset never arrives"): ``LoseFrames(match=lambda h: h.group == 0 and h.cmd == 5,
    direction="to_host")``. Both serial framings are recognised; bytes of a frame are held until
    the frame is complete (frames are written whole, so this adds no real delay), bytes outside
    frames pass. At most ``max_faults`` frames (default 1) are lost.
    """

    kind = "lose-frame"

    def __init__(self, *, match: Callable[[Any], bool], **kw: Any) -> None:
        kw.setdefault("max_faults", 1)
        super().__init__(**kw)
        self.match = match
        self.buf = {d: bytearray() for d in DIRECTIONS}
        self.lost: list[tuple[str, Any]] = []

    def _bypass(self, d: str, data: bytes, pos: int) -> bytes:
        # Switched off with part of a frame held: it goes out now.
        if self.buf[d]:
            data = bytes(self.buf[d]) + data
            self.buf[d].clear()
        return data

    def _apply(self, d: str, data: bytes, pos: int) -> bytes:
        from ..protocol import Header

        b = self.buf[d]
        b += data
        out = bytearray()
        while b:
            p = b.find(b"\x06")
            if p < 0:
                out += b
                b.clear()
                break
            out += b[:p]
            del b[:p]
            split = _split_frame(b)
            if split is None:
                break  # incomplete: wait for more bytes
            raw_len, frame = split
            raw = bytes(b[:raw_len])
            del b[:raw_len]
            if frame is not None and len(frame) >= 8:
                h = Header.unpack(frame)
                if self.match(h) and self._take(d, pos, f"lost frame g{h.group} c{h.cmd} op{h.op} seq{h.seq}"):
                    self.lost.append((d, h))
                    continue
            out += raw
        return bytes(out)

    def describe(self) -> str:
        return f"lose matching frames {self.direction} cap {self.max_faults}"


def _split_frame(b: bytearray) -> tuple[int, bytes | None] | None:
    """At a 0x06: (raw length, SMP frame or None if not a valid frame), or None if incomplete."""
    import base64
    import binascii

    if len(b) < 2:
        return None
    if b[1] == 0x0B:
        if len(b) < 5:
            return None
        n = (b[2] << 8) | b[3]
        if b[4] != (~(b[2] + b[3])) & 0xFF:
            return 1, None
        if len(b) < 7 + n:
            return None
        return 7 + n, bytes(b[5:5 + n])
    if b[1] != 0x09:
        return 1, None
    pkt = bytearray()
    i = 0
    while True:
        e = b.find(b"\n", i)
        if e < 0:
            return None
        try:
            pkt += base64.b64decode(bytes(b[i + 2:e]))
        except (binascii.Error, ValueError):
            return e + 1, None
        i = e + 1
        if len(pkt) >= 2 and len(pkt) >= ((pkt[0] << 8) | pkt[1]) + 2:
            total = (pkt[0] << 8) | pkt[1]
            return i, bytes(pkt[2:total])
        if i + 2 > len(b):
            return None
        if b[i:i + 2] != b"\x04\x14":
            return i, None


FAULT_KINDS: dict[str, type[FaultShaper]] = {
    "drop": DropBytes,
    "corrupt": CorruptBytes,
    "dup": DuplicateBytes,
    "garbage": InsertGarbage,
    "stall": StallLine,
    "cut": CutFrame,
    "lose-frame": LoseFrames,
}


def make_shaper(kind: str, **kw: Any) -> FaultShaper:
    """``make_shaper("drop", every=3000, direction="both", seed=1, max_faults=8)``."""
    try:
        cls = FAULT_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(FAULT_KINDS)}") from None
    return cls(**kw)


# --------------------------------------------------------------------------------------------
# UDP


def _parse_addr(addr: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(addr, tuple):
        return addr[0], int(addr[1])
    a = addr[len("udp:"):] if addr.startswith("udp:") else addr
    host, sep, port = a.rpartition(":")
    if not sep:
        return a, UDP_PORT
    return host, int(port)


@dataclass
class _Flow:
    """One client (address) and its own socket to the device."""

    client: tuple[str, int]
    up: socket.socket
    held: dict[str, tuple[bytes, float] | None] = field(default_factory=lambda: {d: None for d in DIRECTIONS})


class UDPFaultProxy:
    """A UDP relay on its own loopback address (port 1337, so smpmgr can use it) that forwards
    datagrams to ``device_addr`` and the replies back, losing, duplicating and reordering some.

    Per datagram in a faulted direction, one draw decides: lost (``loss``), sent twice (``dup``),
    or held and sent after the next datagram of the same client and direction (``reorder``; a held
    datagram with no successor goes out after ``hold_s`` seconds). The first ``start`` datagrams of
    each direction pass untouched; at most ``max_faults`` faults (None: no cap).
    ``listen_host=None`` takes a free 127.0.0.K the way the simulator does, so it never collides
    with a simulated device. Use as a context manager or start()/stop().
    """

    def __init__(self, listen_host: str | None, device_addr: str | tuple[str, int], *, loss: float = 0.0,
                 dup: float = 0.0, reorder: float = 0.0, seed: int = 0, direction: Direction = "both",
                 max_faults: int | None = None, hold_s: float = 0.3, start: int = 0,
                 port: int = UDP_PORT) -> None:
        if min(loss, dup, reorder) < 0 or loss + dup + reorder > 1:
            raise ValueError("loss, dup and reorder are probabilities that add up to at most 1")
        self.listen_host = listen_host
        self.port = port
        self.device_addr = _parse_addr(device_addr)
        self.loss = loss
        self.dup = dup
        self.reorder = reorder
        self.seed = seed
        self.rng = random.Random(seed)
        self.direction = direction
        self.dirs = _dirs(direction)
        self.max_faults = max_faults
        self.hold_s = hold_s
        self.start_after = start
        self.enabled = True
        self.host: str | None = None
        self._claimed = False
        self._sock: socket.socket | None = None
        self._flows: dict[tuple[str, int], _Flow] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._lock = threading.Lock()
        self.counts = {d: {"datagrams": 0, "forwarded": 0, "lost": 0, "duplicated": 0, "reordered": 0}
                       for d in DIRECTIONS}
        self.error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def address(self) -> str:
        if self.host is None:
            raise RuntimeError("proxy not started")
        return f"udp:{self.host}:{self.port}"

    def start(self) -> UDPFaultProxy:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        host = self.listen_host
        if host is None:
            host = _claim_udp(None)
            self._claimed = True
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind((host, self.port))
        except OSError:
            s.close()
            if self._claimed:
                _release_udp(host)
                self._claimed = False
            raise
        s.setblocking(False)
        self._sock = s
        self.host = host
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"udp-fault-proxy-{host}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop = True
        assert self._wake_w is not None
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join()
        self._thread = None
        for f in self._flows.values():
            f.up.close()
        self._flows.clear()
        for s in (self._sock, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._sock = self._wake_r = self._wake_w = None
        if self._claimed and self.host is not None:
            _release_udp(self.host)
            self._claimed = False

    def __enter__(self) -> UDPFaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- counters ---------------------------------------------------------------------------
    @property
    def faults(self) -> int:
        with self._lock:
            return sum(c["lost"] + c["duplicated"] + c["reordered"] for c in self.counts.values())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "kind": "udp",
                "loss": self.loss, "dup": self.dup, "reorder": self.reorder, "seed": self.seed,
                "direction": self.direction, "max_faults": self.max_faults, "start": self.start_after,
                "faults": sum(c["lost"] + c["duplicated"] + c["reordered"] for c in self.counts.values()),
                "clients": len(self._flows),
                **{d: dict(c) for d, c in self.counts.items()},
            }

    def describe(self) -> str:
        start = f" after {self.start_after}" if self.start_after else ""
        return (f"udp loss={self.loss:g} dup={self.dup:g} reorder={self.reorder:g} {self.direction}{start} "
                f"cap {self.max_faults}")

    # -- relay thread -----------------------------------------------------------------------
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        assert self._sock is not None and self._wake_r is not None
        sel.register(self._sock, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop:
                sel_timeout = self._next_hold_deadline()
                if sel_timeout is not None:
                    sel_timeout = max(0.0, sel_timeout - time.monotonic())
                for key, _ in sel.select(sel_timeout):
                    if key.data == "wake":
                        try:
                            self._wake_r.recv(64)
                        except BlockingIOError:
                            pass
                    elif key.data is None:
                        self._from_client(sel)
                    else:
                        self._from_device(key.data)
                self._release_expired()
        except BaseException as e:  # pragma: no cover - a proxy bug; surfaced through .error
            self.error = e
            raise
        finally:
            sel.close()

    def _from_client(self, sel: selectors.BaseSelector) -> None:
        assert self._sock is not None
        for _ in range(64):
            try:
                data, client = self._sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            flow = self._flows.get(client)
            if flow is None:
                up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                up.bind((self.host, 0))
                up.connect(self.device_addr)
                up.setblocking(False)
                flow = _Flow(client, up)
                with self._lock:
                    self._flows[client] = flow
                sel.register(up, selectors.EVENT_READ, flow)
            self._route("to_device", flow, data)

    def _from_device(self, flow: _Flow) -> None:
        for _ in range(64):
            try:
                data = flow.up.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP unreachable while the device restarts: like silence
                return
            self._route("to_host", flow, data)

    def _send(self, d: str, flow: _Flow, data: bytes) -> None:
        try:
            if d == "to_device":
                flow.up.send(data)
            else:
                assert self._sock is not None
                self._sock.sendto(data, flow.client)
        except OSError:
            pass  # nobody listening (device resetting, client gone): the datagram is lost

    def _route(self, d: str, flow: _Flow, data: bytes) -> None:
        c = self.counts[d]
        with self._lock:
            c["datagrams"] += 1
        fault = None
        if (self.enabled and d in self.dirs and c["datagrams"] > self.start_after
                and (self.max_faults is None or self.faults < self.max_faults)):
            r = self.rng.random()
            if r < self.loss:
                fault = "lost"
            elif r < self.loss + self.dup:
                fault = "duplicated"
            elif r < self.loss + self.dup + self.reorder and flow.held[d] is None:
                fault = "reordered"
        if fault is not None:
            with self._lock:
                c[fault] += 1
        if fault == "lost":
            return
        if fault == "reordered":
            flow.held[d] = (data, time.monotonic() + self.hold_s)
            return
        self._send(d, flow, data)
        if fault == "duplicated":
            self._send(d, flow, data)
        with self._lock:
            c["forwarded"] += 1
        held = flow.held[d]
        if held is not None:
            flow.held[d] = None
            self._send(d, flow, held[0])
            with self._lock:
                c["forwarded"] += 1

    def _next_hold_deadline(self) -> float | None:
        ds = [h[1] for f in self._flows.values() for h in f.held.values() if h is not None]
        return min(ds) if ds else None

    def _release_expired(self) -> None:
        now = time.monotonic()
        for f in list(self._flows.values()):
            for d, h in f.held.items():
                if h is not None and h[1] <= now:
                    f.held[d] = None
                    self._send(d, f, h[0])
                    with self._lock:
                        self.counts[d]["forwarded"] += 1

