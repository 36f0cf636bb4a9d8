"""Campaign workers over a shared PostgreSQL ledger: several processes take the
units of one campaign under leases; one killed with SIGKILL loses its units
when their leases run out and another carries them on, never upgrading a
device twice (boot counters and confirmation sequence numbers of the simulated
devices say so); the database server stopped and started again mid-campaign;
a worker holding another image is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import BIN, Images, run_cli, sim_client
from meterota.campaign.ledger import Ledger
from meterota.campaign.plan import load
from meterota.campaign.runner import create
from meterota.concentrator import Concentrator
from meterota.confirm import verify
from meterota.lab.fleet import Fleet, FleetOptions
from meterota.lab.sim import SimDevice, _claim_udp, _release_udp
from meterota.store import Store
from test_campaign import device_info, ledger_rows, register, write_plan

pytestmark = [pytest.mark.pg, pytest.mark.usefixtures("sim_only")]

LEASE = "3"  # seconds: the takeover time of a dead worker in these tests


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    return str(pg_server.new_database())


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Fleet, list[SimDevice]]]:
    """Two concentrators x 3 meters and four direct devices on UDP."""
    f = Fleet(tmp_path / "f", 2, 3, FleetOptions(meter_reset_s=8))
    directs = [SimDevice(tmp_path / f"w{i}", device_id=f"direct-w{i}", transport="udp") for i in range(1, 5)]
    try:
        f.start()
        for d in directs:
            d.start()
        yield f, directs
    finally:
        f.stop()
        for d in directs:
            d.stop()


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(BIN / "meterota"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def units(url: str, cid: str) -> list[dict[str, Any]]:
    with Store(url) as st:
        return Ledger(st).units(cid)


def owner_pid(owner: str | None) -> int | None:
    return int(owner.split(":")[1]) if owner else None


def wait_for(what: str, cond: Any, procs: list[subprocess.Popen[str]], timeout: float = 180) -> Any:
    """Poll the ledger until cond() is true; a process that died early fails the test."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        for p in procs:
            assert p.poll() is None, (what, p.communicate())
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # polling the ledger for a state; not synchronisation


def check_each_device_once(url: str, cid: str, devices: list[SimDevice]) -> dict[str, dict[str, Any]]:
    rows = ledger_rows(url, cid)
    assert all(r["state"] == "OK" and r["verified"] for r in rows.values()), rows
    assert len(rows) == len(devices)
    with Store(url) as st:
        led = Ledger(st)
        results: dict[str, int] = {}
        for e in led.events(cid):
            if e["kind"] == "result":
                results[e["target"]] = results.get(e["target"], 0) + 1
        oks: dict[str, int] = {}
        for o in st.outcomes(limit=10_000):
            if o["campaign"] == cid and o["result"] == "OK":
                oks[o["device"]] = oks.get(o["device"], 0) + 1
    assert set(results.values()) == {1}, results  # every device ended once
    assert set(oks.values()) == {1} and len(oks) == len(devices), oks  # one OK record each
    for d in devices:
        # One upgrade per device: its confirmation record is its first (seq 1).
        assert verify(bytes(rows[d.device_id]["record"]), bytes(rows[d.device_id]["mac"]), d.key).seq == 1
    return rows


@pytest.mark.pg_core
def test_two_workers_share_a_campaign_and_a_killed_one_is_taken_over(
        rig: tuple[Fleet, list[SimDevice]], images: Images, tmp_path: Path, pg_url: str) -> None:
    f, directs = rig
    register(pg_url, f.meters + f.concentrators + directs)  # type: ignore[arg-type]
    plan = write_plan(tmp_path / "plan.toml", images.app("1.1.0"), [
        {"name": "all", "devices": [d.address for d in directs],
         "concentrators": [{"address": c.address} for c in f.concentrators]}], concurrency=2)
    worker = spawn("--db", pg_url, "campaign", "worker", "--concurrency", "2", "--lease", LEASE)
    run = spawn("--db", pg_url, "campaign", "run", str(plan), "--id", "w", "--lease", LEASE, "--json")
    try:
        # Kill the worker once it holds two units and is upgrading in one of them.
        def busy() -> list[dict[str, Any]]:
            try:
                us = [u for u in units(pg_url, "w") if u["state"] == "leased" and owner_pid(u["owner"]) == worker.pid]
                rows = ledger_rows(pg_url, "w")
            except Exception:  # noqa: BLE001 - the campaign is not created yet
                return []
            started = [u for u in us if any(r["state"] == "running" and (r["address"] == u["unit"])
                                            for r in rows.values())]
            return us if len(us) == 2 and started else []

        held = wait_for("the worker to hold two units and start one", busy, [worker, run])
        os.killpg(worker.pid, signal.SIGKILL)
        worker.communicate()
        killed_at = time.time()
        before = ledger_rows(pg_url, "w")
        done_before = {k for k, r in before.items() if r["state"] == "OK"}
        everything = f.meters + directs
        boots = {d.device_id: device_info(d)["boots"] for d in everything if d.device_id in done_before}

        out, err = run.communicate(timeout=300)
    finally:
        for p in (worker, run):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    assert run.returncode == 0, err
    assert json.loads(out)["state"] == "done"
    rows = check_each_device_once(pg_url, "w", f.meters + directs)
    # The worker's units were taken over once their leases ran out, by the run.
    after = {u["unit"]: u for u in units(pg_url, "w")}
    for u in held:
        assert after[u["unit"]]["leases"] == 2 and owner_pid(after[u["unit"]]["owner"]) == run.pid
        assert after[u["unit"]]["state"] == "done"
    with Store(pg_url) as st:
        led = Ledger(st)
        takeovers = [e for e in led.events("w") if e["kind"] == "takeover"]
        assert {e["target"] for e in takeovers} == {u["unit"] for u in held}
        took = min(e["t"] for e in takeovers)
        jobs = led.jobs("w")
    assert 0 < took - killed_at < 30  # a lease (3 s) and a poll after the kill, with room for a loaded machine
    st = json.loads(run_cli("meterota", "--db", pg_url, "campaign", "status", "w", "--json", check=True).stdout)
    assert st["units"] == {"done": 6} and st["workers"] == [] and st["counts"] == {"OK": 10}
    # Devices finished before the kill were not touched again: they did not even reboot.
    assert {d.device_id: device_info(d)["boots"] for d in everything if d.device_id in done_before} == boots
    # One job per concentrator: a taken-over concentrator's job was followed by its id.
    assert sorted((j["concentrator"], j["round"]) for j in jobs) == sorted((c.address, 0) for c in f.concentrators)
    for c in f.concentrators:
        cl = sim_client(c)
        try:
            assert [j["job"] for j in Concentrator(cl).status()] == [1]
        finally:
            cl.t.close()
    assert rows


@pytest.mark.pg_core
def test_database_restarted_mid_campaign(rig: tuple[Fleet, list[SimDevice]], images: Images, tmp_path: Path,
                                         pg_server: Any, pg_url: str) -> None:
    f, directs = rig
    register(pg_url, f.meters + f.concentrators + directs)  # type: ignore[arg-type]
    plan = write_plan(tmp_path / "plan.toml", images.app("1.2.0"), [
        {"name": "all", "devices": [d.address for d in directs],
         "concentrators": [{"address": c.address} for c in f.concentrators]}], concurrency=6)
    run = spawn("--db", pg_url, "campaign", "run", str(plan), "--id", "r", "--lease", LEASE, "--json")
    try:
        wait_for("a first result", lambda: any(r["state"] == "OK" for r in ledger_rows(pg_url, "r").values())
                 if _exists(pg_url, "r") else False, [run])
        pg_server.stop("fast")  # every connection is cut
        try:
            time.sleep(2)  # the outage lasts: the fault itself, not a synchronisation
            assert run.poll() is None
        finally:
            pg_server.start()
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    assert run.returncode == 0, err
    assert "unreachable" in err and "waiting for it" in err and "is back" in err
    check_each_device_once(pg_url, "r", f.meters + directs)


def _exists(url: str, cid: str) -> bool:
    with Store(url) as st:
        return Ledger(st).campaign(cid) is not None


@pytest.mark.pg_core
def test_a_worker_with_another_image_is_refused(images: Images, tmp_path: Path, pg_url: str) -> None:
    plan_path = write_plan(tmp_path / "plan.toml", images.app("1.1.0"), [
        {"name": "g", "devices": ["udp:127.0.0.250"]}])  # never contacted: the worker is refused first
    with Store(pg_url) as st:
        create(Ledger(st), load(plan_path), str(plan_path), "img")
    other = images.app("1.5.0")
    p = run_cli("meterota", "--db", pg_url, "campaign", "worker", "--campaign", "img", "--image", str(other),
                "--until-idle")
    assert p.returncode == 4, p.stderr
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("meterota: error:")]
    assert len(line) == 1 and "refusing campaign img" in line[0] and "1.5.0" in line[0] and "1.1.0" in line[0]
    # It took nothing.
    assert [(u["state"], u["leases"]) for u in units(pg_url, "img")] == [("pending", 0)]


@pytest.mark.pg_core
def test_sigterm_hands_the_units_back(images: Images, tmp_path: Path, pg_url: str) -> None:
    """A worker stopped by SIGTERM (a host being patched) gives its units back at
    once: another worker need not wait for the lease to run out."""
    silent = _claim_udp(None)  # a loopback address reserved for us and never answered: a device off the network
    addr = f"udp:{silent}"
    plan_path = write_plan(tmp_path / "plan.toml", images.app("1.1.0"), [
        {"name": "g", "devices": [addr]}], retry_delay=60, retries={"unreachable": 5})
    with Store(pg_url) as st:
        create(Ledger(st), load(plan_path), str(plan_path), "t")
    w = spawn("--db", pg_url, "campaign", "worker", "--lease", "60", "--timeout", "0.2", "--retries", "0")
    try:
        wait_for("the worker to try the device", lambda: ledger_rows(pg_url, "t")[addr]["attempts"] >= 1, [w])
        [u] = units(pg_url, "t")
        assert u["state"] == "leased" and owner_pid(u["owner"]) == w.pid
        w.send_signal(signal.SIGTERM)
        out, err = w.communicate(timeout=60)
    finally:
        if w.poll() is None:
            os.killpg(w.pid, signal.SIGKILL)
            w.communicate()
        _release_udp(silent)
    assert w.returncode == 0 and "its units were handed back" in err, err
    [u] = units(pg_url, "t")
    assert u["state"] == "pending" and u["owner"] is None
    assert ledger_rows(pg_url, "t")[addr]["state"] == "pending"  # to be retried, not ended
