"""The concentrator role: jobs over simulated meters, all under MicroPython."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import Images, sim_client
from meterota.client import SMPClient
from meterota.concentrator import Concentrator, JobSpec, record_results
from meterota.errors import DeviceTimeout
from meterota.lab.fleet import Fleet, FleetOptions, meter_id
from meterota.image import parse
from meterota.lab.sim import SimDevice
from meterota.store import Store


pytestmark = pytest.mark.usefixtures("sim_only")


def connect(dev: SimDevice) -> SMPClient:
    return sim_client(dev)


def meter_client(fleet: Fleet, mid: str) -> SMPClient:
    return connect(next(d for d in fleet.meters if d.device_id == mid))


def boots_of(fleet: Fleet, mid: str) -> int:
    """The meter's boot count, read directly; a meter the concentrator resets
    at that moment is read once it is back (its next ready)."""
    dev = next(d for d in fleet.meters if d.device_id == mid)
    for _ in range(3):
        gen = dev.ready_generation()
        try:
            m = connect(dev)
            try:
                return int(m.info()["boots"])
            finally:
                m.t.close()
        except DeviceTimeout:
            dev.wait_ready(30, after=gen)  # it was resetting: read it once it is back
    raise AssertionError(f"{mid} did not answer three times in a row")


def keys_into(store: Store, fleet: Fleet) -> None:
    for d in fleet.meters:
        store.set_key(d.device_id, d.key)


@pytest.fixture(scope="module")
def fleet20(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    opts = FleetOptions(unreachable={meter_id(1, 20)}, fail_trial={meter_id(1, 19)}, meter_reset_s=8)
    f = Fleet(tmp_path_factory.mktemp("fleet20"), 1, 20, opts)
    f.start()
    yield f
    f.stop()


def test_job_over_20_meters_with_mixed_outcomes(fleet20: Fleet, images: Images, tmp_path: Path) -> None:
    data = images.app("1.1.0").read_bytes()
    info = parse(data)
    # One meter is already up to date: upgraded directly beforehand.
    up_to_date = meter_id(1, 18)
    m = meter_client(fleet20, up_to_date)
    m.upload(data)
    m.image_test(info.hash)
    dev = next(d for d in fleet20.meters if d.device_id == up_to_date)
    gen = dev.ready_generation()
    m.reset()
    dev.wait_ready(after=gen)
    m.image_confirm()
    uploads_before = m.stats()["programmed"]
    m.t.close()

    c = connect(fleet20.concentrators[0])
    conc = Concentrator(c)
    assert len(conc.meters()) == 20
    t0 = time.monotonic()
    assert conc.store(data) is not None
    job = conc.create_job(info.hash, JobSpec(retries=1, duration=300))
    st = conc.wait(job, 240)
    elapsed = time.monotonic() - t0
    results = {e["meter"]: e for e in conc.results(job)}
    assert st["state"] == "done" and len(results) == 20
    assert results[meter_id(1, 20)]["result"] == "UNREACHABLE" and results[meter_id(1, 20)]["attempts"] == 2
    ko = results[meter_id(1, 19)]
    assert ko["result"] == "KO" and "simulated hardware fault" in ko["reason"] and "rec" in ko
    assert results[up_to_date]["result"] == "OK" and results[up_to_date]["reason"] == "already running this image"
    assert all(results[meter_id(1, i)]["result"] == "OK" for i in range(1, 19))
    # The up-to-date meter got no upload: its flash saw no new programming.
    m = meter_client(fleet20, up_to_date)
    assert m.stats()["programmed"] == uploads_before
    m.t.close()
    # Relayed records verify with each meter's own key and are recorded.
    with Store(tmp_path / "r.db") as db:
        keys_into(db, fleet20)
        rows = record_results(list(conc.results(job)), db, info.hash, info.version_str, c.t.name)
        assert sum(r["verified"] for r in rows) == 19  # all but the unreachable one
        assert {r["result"] for r in rows} == {"OK", "KO", "UNREACHABLE"}
        assert len(list(db.outcomes(limit=100))) == 20
    print(f"\n[concentrator] job over 20 meters ({len(data)} B image): {elapsed:.1f} s, "
          f"{st['ok']} OK, {st['ko']} KO, {st['unreachable']} unreachable")
    c.t.close()


def test_forged_relayed_confirmation_is_rejected(fleet20: Fleet, images: Images, tmp_path: Path) -> None:
    data = images.app("1.1.0").read_bytes()
    info = parse(data)
    c = connect(fleet20.concentrators[0])
    conc = Concentrator(c)
    jobs = [j for j in conc.status() if j["state"] == "done"]
    results = list(conc.results(jobs[-1]["job"])) if jobs else []
    if not results:
        job = conc.create_job(info.hash, JobSpec(targets=[meter_id(1, 1)], retries=0))
        conc.wait(job, 60)
        results = list(conc.results(job))
    c.t.close()
    genuine = next(e for e in results if e["result"] == "OK" and "rec" in e)
    forged = dict(genuine)
    forged["rec"] = bytes(genuine["rec"]).replace(b"OK", b"KO") if b"OK" in genuine["rec"] else genuine["rec"] + b"x"
    # A record passed off as another meter's (results come in the order meters finished, which with
    # meters worked on at once need not be meter 1 first).
    other_key = dict(genuine, meter=meter_id(1, 2) if genuine["meter"] != meter_id(1, 2) else meter_id(1, 1))
    with Store(tmp_path / "r.db") as db:
        keys_into(db, fleet20)
        rows = record_results([genuine, forged, other_key], db, info.hash, info.version_str, "conc")
    assert rows[0]["result"] == "OK" and rows[0]["verified"]
    assert rows[1]["result"] == "ERROR" and "MAC does not verify" in rows[1]["reason"]
    assert rows[2]["result"] == "ERROR" and not rows[2]["verified"]


def test_priority_orders_jobs_and_restart_resumes(tmp_path: Path, images: Images) -> None:
    f = Fleet(tmp_path / "f", 1, 6, FleetOptions(meter_reset_s=8))
    f.start()
    try:
        data = images.app("1.2.0").read_bytes()
        info = parse(data)
        c = connect(f.concentrators[0])
        conc = Concentrator(c)
        conc.store(data)
        start = int(time.time()) + 3  # both jobs exist before either may start
        low = conc.create_job(info.hash, JobSpec(targets=[meter_id(1, i) for i in (1, 2, 3)], priority=1,
                                                 window=(start, start + 600)))
        high = conc.create_job(info.hash, JobSpec(targets=[meter_id(1, i) for i in (4, 5, 6)], priority=9,
                                                  window=(start, start + 600)))
        # Restart the concentrator once the first meter of the high job is done.
        conc_dev = f.concentrators[0]
        deadline = time.monotonic() + 120
        while conc.status(high)[0]["ok"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)  # polling job state, not synchronisation
        c.t.close()
        before = {i: boots_of(f, meter_id(1, i)) for i in range(1, 7)}
        gen = conc_dev.ready_generation()
        conc_dev.kill()
        conc_dev.wait_ready(after=gen)
        c = connect(conc_dev)
        conc = Concentrator(c)
        assert conc.wait(high, 120)["ok"] == 3
        assert conc.wait(low, 120)["ok"] == 3
        hi = list(conc.results(high))
        lo = list(conc.results(low))
        assert max(e["order"] for e in hi) < min(e["order"] for e in lo)
        # Each meter has exactly one result, and meters finished before the
        # restart were not flashed again (their boot count did not move).
        assert sorted(e["meter"] for e in hi + lo) == [meter_id(1, i) for i in range(1, 7)]
        done_before = [i for i in range(4, 7) if before[i] > 1]
        assert done_before
        for i in done_before:
            m = meter_client(f, meter_id(1, i))
            assert m.info()["boots"] == before[i]
            m.t.close()
        c.t.close()
    finally:
        f.stop()



def test_slow_and_lossy_meters_still_end_ok(tmp_path: Path, images: Images) -> None:
    slow, lossy = meter_id(1, 1), meter_id(1, 2)
    f = Fleet(tmp_path / "f", 1, 2, FleetOptions(slow={slow}, lossy={lossy}, loss=0.05, meter_reset_s=8))
    f.start()
    try:
        data = images.app("1.3.0").read_bytes()
        c = connect(f.concentrators[0])
        conc = Concentrator(c)
        conc.store(data)
        job = conc.create_job(parse(data).hash, JobSpec(retries=3, duration=300))
        st = conc.wait(job, 240)
        assert st["ok"] == 2, list(conc.results(job))
        assert all(p.stats()["faults"] > 0 for p in f.proxies)
        c.t.close()
    finally:
        f.stop()
