"""Parallel unicast on a Wi-Fi-like star (lab.medium, a link per meter): a lost
frame costs the concentrator one measured round trip, not a fixed timeout, and
no lost reply turns a finished upload into a failed attempt. The medium's trace
shows what went over the air; its drop hook loses exactly the frames named.
The 100-meter figures are `make fanout`."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

import cbor2
import pytest

from conftest import Images, sim_client
from meterota.concentrator import Concentrator, JobSpec
from meterota.image import parse
from meterota.lab.fleet import Fleet, FleetOptions
from meterota.lab.medium import Frame

OP_WRITE, OP_WRITE_RSP = 2, 3


pytestmark = pytest.mark.usefixtures("sim_only")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("star"), 1, 2, FleetOptions(medium="star:1M,loss=0%", meter_reset_s=8))
    f.start()
    yield f
    f.stop()


def _hdr(data: bytes) -> tuple[int, int, int, int]:
    op, _flags, _ln, group, seq, cmd = struct.unpack_from(">BBHHBB", data)
    return op & 7, group, cmd, seq


def _once_per_station(pred):  # type: ignore[no-untyped-def]
    """A drop hook losing, on each station, the first frame `pred` names."""
    done: set[int] = set()

    def drop(d: str, station: int, data: bytes) -> bool:
        if station in done or not pred(d, data):
            return False
        done.add(station)
        return True

    return drop


def _run_losing(fleet: Fleet, data: bytes, pred) -> tuple[dict[str, dict], list[Frame]]:  # type: ignore[no-untyped-def,type-arg]
    """One unicast job for both meters with, on each meter's link, the first
    frame `pred` names lost; its results by meter, and the medium's trace."""
    med = fleet.media[0]
    med.drop = _once_per_station(pred)
    med.trace = []
    try:
        c = sim_client(fleet.concentrators[0])
        conc = Concentrator(c)
        conc.store(data)
        job = conc.create_job(parse(data).hash, JobSpec(retries=2, duration=300, mode="unicast"))
        st = conc.wait(job, 240)
        results = {e["meter"]: e for e in conc.results(job)}
        c.t.close()
    finally:
        med.drop = None
        trace, med.trace = med.trace, None
    assert st["state"] == "done" and st["ok"] == 2, (results, fleet.concentrators[0].log_tail(30))
    return results, trace


def test_a_lost_request_is_sent_again_after_a_round_trip_not_a_timeout(fleet: Fleet, images: Images) -> None:
    data = images.app("1.1.0").read_bytes()
    # Lose each meter's first "test this image" request (image state write):
    # nothing after it in flight, so only the concentrator's own timer brings it back.
    results, trace = _run_losing(fleet, data, lambda d, f: d == "down" and _hdr(f)[:3] == (OP_WRITE, 1, 0))
    assert all(e["result"] == "OK" and e["attempts"] == 1 for e in results.values()), results
    for station in (0, 1):
        down = [f for f in trace if f.station == station and f.d == "down"]
        lost = next(i for i, f in enumerate(down) if f.lost and _hdr(f.data)[:3] == (OP_WRITE, 1, 0))
        again = next(f for f in down[lost + 1:] if f.data == down[lost].data)  # the same frame, same seq
        # The meter's round trip on a 1 Mbit/s link is a few ms: the request is
        # resent within its RTO (at least 100 ms), long before the 2 s timeout
        # it waited for before.
        assert again.t - down[lost].t < 1.5, (station, again.t - down[lost].t)
        # Uploads fill the meter's buf_size (2048): about 1.9 KiB of image per request.
        chunks = [f for f in down if _hdr(f.data)[:3] == (OP_WRITE, 1, 1)]
        assert max(len(f.data) for f in chunks) > 1900
        assert len(chunks) < len(data) / 1800 + 5


def _last_reply(size: int):  # type: ignore[no-untyped-def]
    def pred(d: str, f: bytes) -> bool:
        if d != "up" or _hdr(f)[:3] != (OP_WRITE_RSP, 1, 1):
            return False
        body = cbor2.loads(f[8:])
        return isinstance(body, dict) and body.get("off") == size
    return pred


def test_a_lost_reply_to_the_last_chunk_is_not_a_failed_attempt(fleet: Fleet, images: Images) -> None:
    data = images.app("1.2.0").read_bytes()
    # The meter has the whole image, but its reply saying so is lost: the
    # concentrator's resend finds no session (a meter answers off 0), and must
    # ask the meter (the upload's first request resumes or reports it done)
    # rather than call the attempt failed.
    results, trace = _run_losing(fleet, data, _last_reply(len(data)))
    assert sum(1 for f in trace if f.lost) == 2
    assert all(e["result"] == "OK" and e["attempts"] == 1 for e in results.values()), results



def test_a_lost_reset_request_is_sent_again_not_waited_out(fleet: Fleet, images: Images) -> None:
    data = images.app("1.3.0").read_bytes()
    # Lose each meter's first reset request: the meter keeps answering from the
    # boot before, which says the reset never arrived (before, the concentrator
    # waited out the meter's whole reset time and failed the attempt).
    results, trace = _run_losing(fleet, data, lambda d, f: d == "down" and _hdr(f)[:3] == (OP_WRITE, 0, 5))
    assert sum(1 for f in trace if f.lost) == 2
    assert all(e["result"] == "OK" and e["attempts"] == 1 for e in results.values()), results
