"""A simulated fan-out: N concentrators, each with M meter NICs on their own
UDP links, all under MicroPython. Chosen meters can be unreachable (listed but
never started), slow (50 ms added to every datagram), lossy (behind a UDP proxy
that drops datagrams) or fail their trial boot (a simulated hardware fault on
the new image). With a medium (``FleetOptions.medium``, e.g. ``shared:50k,loss=5%``)
each concentrator's meters sit on one lab.medium.Medium: shared airtime (or a
star of own links), latency, loss, and a broadcast address for multicast
sessions, with the bytes and airtime counted."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .faults import UDPFaultProxy
from .medium import Medium, MediumSpec
from .sim import SimDevice, _claim_udp, _release_udp


def meter_id(c: int, m: int) -> str:
    return f"meter-{c:02d}{m:02d}"


def concentrator_id(c: int) -> str:
    return f"conc-{c:02d}"


@dataclass
class FleetOptions:
    unreachable: set[str] = field(default_factory=set)
    lossy: set[str] = field(default_factory=set)
    fail_trial: set[str] = field(default_factory=set)
    slow: set[str] = field(default_factory=set)
    loss: float = 0.15
    slow_delay_s: float = 0.05  # added to every datagram of a slow meter, each way
    transport: str = "udp"  # the concentrators' upstream link
    heap: str = "128wK"  # a meter NIC
    concentrator_heap: str = "256wK"  # a concentrator is a bigger board (ESP32 with PSRAM class)
    meter_reset_s: int = 10
    medium: str | None = None  # e.g. "shared:50k,loss=5%" or "star:1M": lab.medium; None: plain loopback UDP
    parallel: int | None = None  # the concentrators' default number of meters worked on at once
    multicast: str | None = None  # the concentrators' default session mode: auto | multicast | unicast
    no_multicast: set[str] = field(default_factory=set)  # meters whose receiver lacks the multicast command
    concentrator_config: dict[str, Any] = field(default_factory=dict)  # more concentrator config (mc_parity, mc_rounds)


class Fleet:
    def __init__(self, base: Path, concentrators: int, meters: int, opts: FleetOptions | None = None):
        self.base = Path(base)
        self.opts = opts or FleetOptions()
        self.n = concentrators
        self.m = meters
        self.meters: list[SimDevice] = []
        self.concentrators: list[SimDevice] = []
        self.proxies: list[UDPFaultProxy] = []
        self.media: list[Medium] = []  # one per concentrator, with FleetOptions.medium
        self.links: list[Medium] = []  # the slow meters' own links
        self.spec = MediumSpec.parse(self.opts.medium) if self.opts.medium else None
        self._reserved: list[str] = []

    def start(self, timeout: float = 60.0) -> None:
        try:
            for c in range(1, self.n + 1):
                med = None
                if self.spec is not None:
                    med = Medium(MediumSpec(**{**self.spec.__dict__, "seed": self.spec.seed * 1000 + c}))
                    self.media.append(med)
                links = [self._meter(c, m, timeout, med) for m in range(1, self.m + 1)]
                extra: dict[str, Any] = {"role": "concentrator", "meters": links,
                                         "meter_reset_s": self.opts.meter_reset_s}
                if med is not None:
                    med.start()
                    extra["medium"] = {"kind": med.spec.kind, "bps": med.spec.rate_bps,
                                       "bcast": f"udp:{med.broadcast_address}"}
                if self.opts.parallel is not None:
                    extra["parallel"] = self.opts.parallel
                if self.opts.multicast is not None:
                    extra["multicast"] = self.opts.multicast
                extra.update(self.opts.concentrator_config)
                d = SimDevice(self.base / concentrator_id(c), device_id=concentrator_id(c),
                              transport=self.opts.transport,  # type: ignore[arg-type]
                              heap=self.opts.concentrator_heap, extra=extra)
                self.concentrators.append(d)
                d.start(timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def _meter(self, c: int, m: int, timeout: float, med: Medium | None = None) -> dict[str, str]:
        mid = meter_id(c, m)
        if mid in self.opts.unreachable:
            host = _claim_udp(None)  # reserved, never answered: a meter off the network
            self._reserved.append(host)
            return {"id": mid, "link": f"udp:{host}:1337"}
        extra: dict[str, Any] = {"fail_trial": True} if mid in self.opts.fail_trial else {}
        if mid in self.opts.no_multicast:
            extra["multicast"] = False
        d = SimDevice(self.base / mid, device_id=mid, transport="udp", heap=self.opts.heap, extra=extra)
        self.meters.append(d)
        d.start(timeout=timeout)
        addr = d.address[len("udp:"):]
        if med is not None:
            return {"id": mid, "link": f"udp:{med.add(addr)}"}  # loss and delay are the medium's
        if mid in self.opts.slow:
            # A link of its own with a fixed latency each way (pipelined traffic
            # stays in order, as on a real slow link).
            slow = Medium(MediumSpec(kind="star", rate_bps=1e9, latency_s=self.opts.slow_delay_s, overhead=0,
                                     seed=c * 100 + m))
            link = slow.add(addr)
            slow.start()
            self.links.append(slow)
            return {"id": mid, "link": f"udp:{link}"}
        if mid in self.opts.lossy:
            p = UDPFaultProxy(None, addr, loss=self.opts.loss, seed=c * 100 + m)
            p.start()
            self.proxies.append(p)
            addr = f"{p.host}:1337"
        return {"id": mid, "link": f"udp:{addr}"}

    def stop(self) -> None:
        for d in self.concentrators + self.meters:
            d.stop()
        for p in self.proxies:
            p.stop()
        for med in self.media + self.links:
            med.stop()
        for h in self._reserved:
            _release_udp(h)

    def __enter__(self) -> "Fleet":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def all_meter_ids(self) -> Iterable[str]:
        return (meter_id(c, m) for c in range(1, self.n + 1) for m in range(1, self.m + 1))
