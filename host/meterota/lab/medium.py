"""An honest medium between a concentrator and its meters.

``shared:50k,loss=5%`` is a PLC-like bus: one transmission at a time for every
station on it (the concentrator and all its meters, both directions), each
frame occupies the medium for ``(len + overhead) * 8 / rate`` seconds and the
others wait; a broadcast is one transmission heard by every meter, each with
its own loss draw. ``star:1M,loss=1%`` is a Wi-Fi-like star: each meter has its
own half-duplex link of that rate, a broadcast is sent once per link.

The medium is a UDP relay on loopback, in one thread: the concentrator sends to
a front address per meter (127.0.0.K:1337) and to one broadcast address; each
meter sees every frame from the concentrator (unicast or broadcast) coming
from the same back socket, and its replies go back over the medium. Frames
wait in a transmit queue of ``queue`` frames per channel (a modem's buffer;
beyond it they are dropped, counted as ``overflow``). Airtime, bytes, frames
and losses are counted per direction, and per SMP command (``by_command``:
which requests and replies take the airtime).

    spec   := kind ":" rate ["," opt]*      kind := shared | star
    rate   := number [k|M] (bit/s)          opt  := loss=P% | latency=MS | overhead=BYTES | queue=N | seed=N
"""

from __future__ import annotations

import heapq
import random
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from .sim import UDP_PORT, _claim_udp, _release_udp

DIRS = ("down", "up", "broadcast")


@dataclass(frozen=True)
class MediumSpec:
    kind: str = "shared"  # shared | star
    rate_bps: float = 50_000.0
    loss: float = 0.0
    latency_s: float = 0.005
    overhead: int = 28  # bytes of framing per frame on the medium (MAC header, preamble, FCS)
    queue: int = 256  # frames a channel's transmit queue holds
    seed: int = 1

    @classmethod
    def parse(cls, text: str) -> "MediumSpec":
        """'shared:50k,loss=5%' -> MediumSpec; ValueError with a readable message otherwise."""
        kind, sep, rest = text.partition(":")
        if kind not in ("shared", "star") or not sep:
            raise ValueError(f"medium {text!r}: expected shared:RATE[,opts] or star:RATE[,opts]")
        parts = [p.strip() for p in rest.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"medium {text!r}: no bit rate")
        kw: dict[str, float | int | str] = {"kind": kind, "rate_bps": _rate(parts[0], text)}
        for p in parts[1:]:
            k, eq, v = p.partition("=")
            try:
                if k == "loss" and eq:
                    loss = float(v.rstrip("%")) / (100 if v.endswith("%") else 1)
                    if not 0 <= loss < 1:
                        raise ValueError
                    kw["loss"] = loss
                elif k == "latency" and eq:
                    kw["latency_s"] = float(v.removesuffix("ms")) / 1000
                elif k in ("overhead", "queue", "seed") and eq:
                    kw[k] = int(v)
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"medium {text!r}: bad option {p!r} (loss=P%, latency=MS, overhead=N, queue=N, "
                                 f"seed=N)") from None
        return cls(**kw)  # type: ignore[arg-type]

    def airtime(self, n: int) -> float:
        return (n + self.overhead) * 8 / self.rate_bps

    def __str__(self) -> str:
        return f"{self.kind}:{self.rate_bps:g}bps,loss={self.loss:.0%},latency={self.latency_s * 1000:g}ms"


def _rate(s: str, text: str) -> float:
    mult = {"k": 1e3, "K": 1e3, "M": 1e6}.get(s[-1:], 1.0)
    try:
        v = float(s[:-1] if mult != 1.0 else s) * mult
    except ValueError:
        raise ValueError(f"medium {text!r}: bad bit rate {s!r}") from None
    if v <= 0:
        raise ValueError(f"medium {text!r}: bad bit rate {s!r}")
    return v


@dataclass
class _Channel:
    free_at: float = 0.0
    queued: list[float] = field(default_factory=list)  # end times of frames not yet on air


@dataclass
class _Station:
    meter_addr: tuple[str, int]
    front: socket.socket  # the concentrator's side: 127.0.0.K:1337
    back: socket.socket  # towards the meter
    host: str
    conc: tuple[str, int] | None = None  # where replies go: the last sender on `front`
    channel: _Channel = field(default_factory=_Channel)
    index: int = -1  # in Medium.stations


class Frame(NamedTuple):
    """One frame put on the medium, as Medium.trace records it."""

    t: float  # when it was offered (time.monotonic())
    d: str  # "down" (to a meter), "up" (a meter's reply) or "broadcast"
    station: int  # index of the meter's station (-1: a broadcast)
    data: bytes
    lost: bool  # lost on the way (the loss draw, or the test's drop hook)


class Medium:
    """One concentrator's medium. add() each meter before start(); the
    concentrator uses address_of(meter) and broadcast_address."""

    def __init__(self, spec: MediumSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.shared = _Channel()
        self.stations: list[_Station] = []
        self._bc: socket.socket | None = None
        self._bc_host: str | None = None
        self._claimed: list[str] = []
        self._events: list[tuple[float, int, socket.socket, tuple[str, int], bytes]] = []
        self._n = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.error: BaseException | None = None
        # Fault injection for tests: every frame offered, when tracing; a hook
        # that loses the frames it returns True for (direction, station, frame);
        # and the next requests of given commands to lose (lose_next).
        self.trace: list[Frame] | None = None
        self.drop: Callable[[str, int, bytes], bool] | None = None
        self._lose: list[tuple[int, int, int]] = []  # (station, group, cmd): the next such request is lost
        self.reset_counts()

    # -- setup ---------------------------------------------------------------------------
    def _bind(self, host: str, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((host, port))
        s.setblocking(False)
        return s

    def _claim(self) -> str:
        h = _claim_udp(None)
        self._claimed.append(h)
        return h

    def add(self, meter_addr: str) -> str:
        """meter_addr 'HOST:PORT' -> the 'HOST:PORT' the concentrator uses for it."""
        host, _, port = meter_addr.rpartition(":")
        front_host = self._claim()
        st = _Station((host, int(port)), self._bind(front_host, UDP_PORT), self._bind("127.0.0.1", 0), front_host)
        st.index = len(self.stations)
        self.stations.append(st)
        return f"{front_host}:{UDP_PORT}"

    def lose_next(self, station: int, group: int, cmd: int) -> None:
        """Lose the next SMP request of group:cmd to the station-th meter added
        (a fault on top of the random loss, for tests)."""
        with self._lock:
            self._lose.append((station, group, cmd))

    @property
    def broadcast_address(self) -> str:
        if self._bc_host is None:
            self._bc_host = self._claim()
            self._bc = self._bind(self._bc_host, UDP_PORT)
        return f"{self._bc_host}:{UDP_PORT}"

    def start(self) -> "Medium":
        self.broadcast_address  # noqa: B018 - bind it before the thread starts
        self._thread = threading.Thread(target=self._run, name="medium", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._wake_w.send(b"x")
            self._thread.join(5)
            self._thread = None
        for st in self.stations:
            st.front.close()
            st.back.close()
        if self._bc is not None:
            self._bc.close()
        for h in self._claimed:
            _release_udp(h)
        self._claimed = []
        self._wake_r.close()
        self._wake_w.close()

    # -- figures ---------------------------------------------------------------------------
    def reset_counts(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.counts = {d: {"frames": 0, "bytes": 0, "airtime_s": 0.0, "lost": 0, "overflow": 0} for d in DIRS}
            self.cmds: dict[str, list[float]] = {}

    def by_command(self) -> dict[str, dict[str, float]]:
        """Frames and airtime per direction and SMP group:command ("up 1:0"), since reset_counts()."""
        with self._lock:
            return {k: {"frames": v[0], "airtime_s": v[1]} for k, v in sorted(self.cmds.items())}

    def _count_cmd(self, d: str, data: bytes) -> None:
        key = f"{d} {int.from_bytes(data[4:6], 'big')}:{data[7]}" if len(data) >= 8 else f"{d} ?"
        c = self.cmds.setdefault(key, [0, 0.0])
        c[0] += 1
        c[1] += self.spec.airtime(len(data))

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            c = {d: dict(v) for d, v in self.counts.items()}
        c["total"] = {k: sum(c[d][k] for d in DIRS) for k in ("frames", "bytes", "airtime_s", "lost", "overflow")}
        return c

    # -- the medium ------------------------------------------------------------------------
    def _transmit(self, ch: _Channel, n: int, now: float, d: str) -> float | None:
        """Put one frame of n bytes on channel ch; returns when it ends on air (None: queue full)."""
        ch.queued = [t for t in ch.queued if t > now]
        if len(ch.queued) >= self.spec.queue:
            self.counts[d]["overflow"] += 1
            return None
        air = self.spec.airtime(n)
        start = max(now, ch.free_at)
        ch.free_at = start + air
        ch.queued.append(ch.free_at)
        c = self.counts[d]
        c["frames"] += 1
        c["bytes"] += n + self.spec.overhead
        c["airtime_s"] += air
        return ch.free_at

    def _deliver(self, end: float, sock: socket.socket, dest: tuple[str, int], data: bytes, d: str,
                 station: int = -1) -> None:
        lost = False
        if d == "down" and self._lose and len(data) >= 8:
            rule = (station, int.from_bytes(data[4:6], "big"), data[7])
            if rule in self._lose:
                self._lose.remove(rule)
                lost = True
        if not lost:
            lost = bool(self.spec.loss and self.rng.random() < self.spec.loss)
        if not lost and self.drop is not None:
            lost = self.drop(d, station, data)
        if self.trace is not None:
            self.trace.append(Frame(time.monotonic(), d, station, data, lost))
        if lost:
            self.counts[d]["lost"] += 1
            return
        self._n += 1
        heapq.heappush(self._events, (end + self.spec.latency_s, self._n, sock, dest, data))

    def _channel(self, st: _Station) -> _Channel:
        return self.shared if self.spec.kind == "shared" else st.channel

    def _on_front(self, st: _Station, data: bytes, src: tuple[str, int], now: float) -> None:
        st.conc = src
        with self._lock:
            end = self._transmit(self._channel(st), len(data), now, "down")
            if end is not None:
                self._count_cmd("down", data)
                self._deliver(end, st.back, st.meter_addr, data, "down", st.index)

    def _on_back(self, st: _Station, data: bytes, src: tuple[str, int], now: float) -> None:
        if src != st.meter_addr or st.conc is None:
            return
        with self._lock:
            end = self._transmit(self._channel(st), len(data), now, "up")
            if end is not None:
                self._count_cmd("up", data)
                self._deliver(end, st.front, st.conc, data, "up", st.index)

    def _on_broadcast(self, data: bytes, src: tuple[str, int], now: float) -> None:
        with self._lock:
            if self.spec.kind == "shared":
                end = self._transmit(self.shared, len(data), now, "broadcast")
                if end is not None:
                    self._count_cmd("broadcast", data)
                    for st in self.stations:
                        self._deliver(end, st.back, st.meter_addr, data, "broadcast")
            else:
                for st in self.stations:  # a star has no common medium: one transmission per link
                    end = self._transmit(st.channel, len(data), now, "broadcast")
                    if end is not None:
                        self._deliver(end, st.back, st.meter_addr, data, "broadcast")

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        assert self._bc is not None
        sel.register(self._bc, selectors.EVENT_READ, ("bc", None))
        for st in self.stations:
            sel.register(st.front, selectors.EVENT_READ, ("front", st))
            sel.register(st.back, selectors.EVENT_READ, ("back", st))
        try:
            while not self._stop:
                now = time.monotonic()
                while self._events and self._events[0][0] <= now:
                    _t, _n, sock, dest, data = heapq.heappop(self._events)
                    try:
                        sock.sendto(data, dest)
                    except OSError:
                        pass  # a meter that is restarting: lost like on the medium
                timeout = max(0.0, self._events[0][0] - now) if self._events else None
                for key, _ev in sel.select(timeout):
                    if key.data is None:
                        self._wake_r.recv(64)
                        continue
                    role, st = key.data
                    fo = key.fileobj
                    assert isinstance(fo, socket.socket)
                    sock = fo
                    while True:
                        try:
                            data, src = sock.recvfrom(65536)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            break  # ICMP port unreachable from a restarting meter
                        now = time.monotonic()
                        if role == "front":
                            self._on_front(st, data, src, now)
                        elif role == "back":
                            self._on_back(st, data, src, now)
                        else:
                            self._on_broadcast(data, src, now)
        except BaseException as e:  # pragma: no cover - surfaced by the owner
            self.error = e
        finally:
            sel.close()
