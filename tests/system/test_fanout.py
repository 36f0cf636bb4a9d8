"""Fan-out over an honest medium (lab.medium): meters of a concentrator on one
shared 100 kbit/s PLC-like medium with 5 % loss, all under MicroPython. One
multicast session for all (with a meter that has no multicast receiver and one
that reboots in the middle of the broadcast; the others' losses repaired by
broadcast XOR rounds), then parallel unicast. The
figures and the 100-meter runs are `make fanout`; this is the real subset."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import Images, port_of, run_cli, sim_client
from meterota.concentrator import Concentrator, JobSpec, record_results
from meterota.image import parse
from meterota.lab.fleet import Fleet, FleetOptions, meter_id
from meterota.store import Store

NO_MC, REBOOTS = meter_id(1, 4), meter_id(1, 3)


pytestmark = pytest.mark.usefixtures("sim_only")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # No parity block in the pass: each member then misses a few blocks nearly surely, for the repair rounds.
    opts = FleetOptions(medium="shared:100k,loss=5%", no_multicast={NO_MC}, meter_reset_s=8,
                        concentrator_config={"mc_parity": False})
    f = Fleet(tmp_path_factory.mktemp("fanout"), 1, 4, opts)
    f.start()
    yield f
    f.stop()


def _wait(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)  # polling counters and job state, not synchronisation


def test_one_multicast_session_for_all_then_repair(fleet: Fleet, images: Images, tmp_path: Path) -> None:
    data = images.app("1.1.0").read_bytes()
    info = parse(data)
    c = sim_client(fleet.concentrators[0])
    conc = Concentrator(c)
    conc.store(data)
    med = fleet.media[0]
    med.reset_counts()
    before = conc.status_full()
    # The first reset request to meter 1 is lost: the concentrator sees it still on
    # its old boot and sends it again, in the same attempt.
    med.lose_next(0, 0, 5)
    # Meter 2 does not answer the announce's info request, nor its retry: its
    # attempt fails, and the session waits for its next one before the pass.
    LATE = meter_id(1, 2)
    med.lose_next(1, 64, 0)
    med.lose_next(1, 64, 0)
    job = conc.create_job(info.hash, JobSpec(retries=2, duration=300))
    # Reboot one meter once the broadcast is 60 % of the way through.
    blocks = -(-len(data) // 1024)
    _wait(lambda: med.snapshot()["broadcast"]["frames"] >= blocks * 0.6, 120, "broadcast never started")
    dev = next(d for d in fleet.meters if d.device_id == REBOOTS)
    gen = dev.ready_generation()
    dev.kill()
    dev.wait_ready(after=gen)
    st = conc.wait(job, 240)
    results = {e["meter"]: e for e in conc.results(job)}
    log = fleet.concentrators[0].log_tail(30)
    assert st["state"] == "done" and st["ok"] == 4, (results, log)
    # Each block went over the medium once, to all meters at once; then the
    # repair rounds, each packet the XOR of blocks no member missed two of:
    # never more packets than frames were lost.
    bc = med.snapshot()["broadcast"]
    full = conc.status_full(job)
    xp, xb = full["xor_packets"] - before["xor_packets"], full["xor_blocks"] - before["xor_blocks"]
    assert bc["frames"] == blocks + xp, (bc, full)
    assert 0 < xp <= bc["lost"], (bc, full)
    # How the image reached each meter: the meter without a multicast
    # receiver by unicast, whole; the others by the session, with at most a
    # few blocks repaired -- the rebooted one resumed from its progress map.
    assert results[NO_MC]["via"] == "unicast" and results[NO_MC]["unicast_bytes"] >= len(data), (results, log)
    for mid in (meter_id(1, 1), meter_id(1, 2), REBOOTS):
        assert results[mid]["via"] == "multicast", results[mid]
    assert 0 < results[REBOOTS]["unicast_bytes"] < len(data) * 0.9, (results[REBOOTS], log, dev.log_tail(30))
    # The two members that heard the whole session got their lost blocks from
    # the broadcast rounds (rebuilt from XOR packets), not by unicast.
    members = (meter_id(1, 1), meter_id(1, 2))
    assert sum(results[m]["xor_blocks"] for m in members) == xb > 0, (results, full)
    assert results[meter_id(1, 1)]["unicast_bytes"] <= 32 + 2 * 1024, results  # the header, a block or two at most
    assert results[LATE]["via"] == "multicast" and results[LATE]["attempts"] == 2, (results, log)
    assert results[LATE]["unicast_bytes"] <= 32 + 2 * 1024, (results[LATE], log)
    assert results[NO_MC]["xor_blocks"] == 0
    assert results[meter_id(1, 1)]["attempts"] == 1, (results, log)  # its lost reset cost no attempt
    # Only the announced, verified image became active: every record verifies.
    with Store(tmp_path / "r.db") as db:
        for d in fleet.meters:
            db.set_key(d.device_id, d.key)
        rows = record_results(list(conc.results(job)), db, info.hash, info.version_str, "conc")
    assert all(r["verified"] and r["result"] == "OK" for r in rows)
    c.t.close()
    # `job results` says how the image got to each meter, and how its losses were repaired.
    p = run_cli("meterota", "--db", str(tmp_path / "r.db"), "job", "results", *port_of(fleet.concentrators[0]),
                str(job))
    assert p.returncode == 0, p.stderr
    lines = {ln.split()[0]: ln for ln in p.stdout.splitlines()[1:]}
    for mid in members:
        r = results[mid]
        assert f"via multicast ({r['xor_blocks']} blocks by XOR repair, {r['unicast_bytes']} B unicast)" in lines[mid]
    assert "via unicast" in lines[NO_MC]


@pytest.mark.slow  # 20 s; make test keeps the multicast session above, which also repairs by unicast
def test_parallel_unicast_works_on_meters_at_once(fleet: Fleet, images: Images) -> None:
    data = images.app("1.2.0").read_bytes()
    info = parse(data)
    c = sim_client(fleet.concentrators[0])
    conc = Concentrator(c)
    conc.store(data)
    two = [meter_id(1, 1), meter_id(1, 2)]  # unicast on this medium is slow: two are enough to overlap
    job = conc.create_job(info.hash, JobSpec(targets=two, retries=2, duration=300, parallel=4, mode="unicast"))
    seen = 0
    deadline = time.monotonic() + 240
    while True:
        full = conc.status_full(job)
        seen = max(seen, full["meters_at_once"])
        if full["jobs"][0]["state"] == "done":
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)  # polling job state, not synchronisation
    results = list(conc.results(job))
    assert all(e["result"] == "OK" and e["via"] == "unicast" for e in results), results
    assert seen >= 2
    assert full["jobs"][0]["parallel"] == 4 and full["heap_live_peak"] > 0
    c.t.close()


@pytest.mark.slow  # 23 s; make test keeps the session above (late announce retried, reboot mid-pass)
def test_a_meter_announced_during_the_pass_joins_it(fleet: Fleet, images: Images) -> None:
    # After the parallel unicast test (1.2.0) when that one runs: a newer image.
    data = images.app("1.3.0").read_bytes()
    info = parse(data)
    c = sim_client(fleet.concentrators[0])
    conc = Concentrator(c)
    conc.store(data)
    med = fleet.media[0]
    late = meter_id(1, 2)
    for _ in range(4):  # its first two attempts' info requests and their retries
        med.lose_next(1, 64, 0)
    three = [meter_id(1, 1), late, meter_id(1, 3)]
    job = conc.create_job(info.hash, JobSpec(targets=three, retries=3, duration=300, mode="multicast"))
    st = conc.wait(job, 240)
    results = {e["meter"]: e for e in conc.results(job)}
    log = fleet.concentrators[0].log_tail(30)
    assert st["state"] == "done" and st["ok"] == 3, (results, log)
    # The pass waited for its second attempt, not its third (two seconds of backoff
    # later): announced during the broadcast, it took the rest of it.
    assert results[late]["attempts"] == 3 and results[late]["via"] == "multicast", (results[late], log)
    assert results[late]["unicast_bytes"] < len(data), (results[late], log)  # 62 % in one run: timing decides
    c.t.close()
