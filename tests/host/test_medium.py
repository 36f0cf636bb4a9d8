"""lab.medium: the simulated medium between a concentrator and its meters is
honest about airtime (one transmission at a time on a shared medium, a link
per meter on a star), broadcast (one transmission, every meter hears it) and
loss, and counts what crossed it."""

from __future__ import annotations

import socket
import time

import pytest

from meterota.lab.medium import Medium, MediumSpec
from meterota.lab.sim import _claim_udp, _release_udp


def test_spec_parse() -> None:
    s = MediumSpec.parse("shared:50k,loss=5%,latency=20ms")
    assert (s.kind, s.rate_bps, s.loss, s.latency_s) == ("shared", 50_000, 0.05, 0.02)
    assert MediumSpec.parse("star:1M").rate_bps == 1e6
    assert s.airtime(1000 - s.overhead) == pytest.approx(0.16)
    for bad in ("bus:50k", "shared", "shared:fast", "shared:50k,loss=150%", "shared:50k,colour=red"):
        with pytest.raises(ValueError, match="medium"):
            MediumSpec.parse(bad)


class Meters:
    """n plain UDP sockets standing in for meters, behind a medium."""

    def __init__(self, spec: str, n: int) -> None:
        self.hosts = [_claim_udp(None) for _ in range(n)]
        self.socks = []
        for h in self.hosts:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((h, 1337))
            s.settimeout(10)
            self.socks.append(s)
        self.medium = Medium(MediumSpec.parse(spec))
        self.front = [self.medium.add(f"{h}:1337") for h in self.hosts]
        self.medium.start()
        self.conc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.conc.bind(("127.0.0.1", 0))

    def addr(self, a: str) -> tuple[str, int]:
        h, _, p = a.rpartition(":")
        return h, int(p)

    def close(self) -> None:
        self.medium.stop()
        for s in self.socks:
            s.close()
        self.conc.close()
        for h in self.hosts:
            _release_udp(h)


def test_shared_medium_serialises_airtime_and_a_star_does_not() -> None:
    frames, size = 10, 472  # + 28 bytes of framing = 500 bytes = 40 ms at 100 kbit/s
    took = {}
    for kind in ("shared", "star"):
        m = Meters(f"{kind}:100k,latency=0", 2)
        try:
            t0 = time.monotonic()
            for _ in range(frames):
                for a in m.front:
                    m.conc.sendto(bytes(size), m.addr(a))
            for s in m.socks:
                for _ in range(frames):
                    assert len(s.recvfrom(2048)[0]) == size
            took[kind] = time.monotonic() - t0
            c = m.medium.snapshot()
            assert c["down"]["frames"] == 2 * frames and c["down"]["bytes"] == 2 * frames * 500
            assert c["down"]["airtime_s"] == pytest.approx(2 * frames * 0.04)
        finally:
            m.close()
    # Shared: 20 frames one after the other (0.8 s); star: two links at once (0.4 s).
    assert took["shared"] >= 0.8
    assert took["star"] >= 0.4 and took["star"] < took["shared"]


def test_broadcast_is_one_transmission_heard_by_all_and_replies_come_back() -> None:
    m = Meters("shared:1M,latency=0", 3)
    try:
        m.conc.sendto(b"block", m.addr(m.medium.broadcast_address))
        srcs = []
        for s in m.socks:
            data, src = s.recvfrom(64)
            assert data == b"block"
            srcs.append(src)
        c = m.medium.snapshot()
        assert c["broadcast"]["frames"] == 1 and c["down"]["frames"] == 0
        # Unicast to one meter arrives from the same address as the broadcast;
        # its reply crosses the medium back to the sender.
        m.conc.sendto(b"req", m.addr(m.front[1]))
        data, src = m.socks[1].recvfrom(64)
        assert data == b"req" and src == srcs[1]
        m.socks[1].sendto(b"rsp", src)
        m.conc.settimeout(10)
        data, src = m.conc.recvfrom(64)
        assert data == b"rsp" and src == m.addr(m.front[1])
        assert m.medium.snapshot()["up"]["frames"] == 1
    finally:
        m.close()


def test_loss_is_drawn_per_receiver_and_counted() -> None:
    m = Meters("shared:10M,loss=30%,latency=0,seed=3", 2)
    try:
        for _ in range(200):
            m.conc.sendto(b"x", m.addr(m.medium.broadcast_address))
        deadline = time.monotonic() + 10
        while m.medium.snapshot()["broadcast"]["frames"] < 200:  # the medium's thread takes them in
            assert time.monotonic() < deadline
            time.sleep(0.01)  # polling a counter, not synchronisation
        c = m.medium.snapshot()["broadcast"]
        assert c["frames"] == 200
        assert 60 < c["lost"] < 180  # of 400 deliveries, ~30 % lost
    finally:
        m.close()


def test_airtime_is_counted_per_smp_command() -> None:
    m = Meters("shared:1M,latency=0", 1)
    try:
        req = bytes([0, 0, 0, 0, 0, 64, 7, 1])  # read, group 64, seq 7, cmd 1
        m.conc.sendto(req, m.addr(m.front[0]))
        data, src = m.socks[0].recvfrom(64)
        m.socks[0].sendto(bytes([1, 0, 0, 4, 0, 64, 7, 1]) + bytes(4), src)
        m.conc.settimeout(10)
        m.conc.recvfrom(64)
        m.conc.sendto(b"x", m.addr(m.medium.broadcast_address))
        m.socks[0].recvfrom(64)
        c = m.medium.by_command()
        assert c["down 64:1"]["frames"] == 1 and c["up 64:1"]["frames"] == 1 and c["broadcast ?"]["frames"] == 1
        assert c["up 64:1"]["airtime_s"] == pytest.approx(m.medium.spec.airtime(12))
        m.medium.reset_counts()
        assert m.medium.by_command() == {}
    finally:
        m.close()
