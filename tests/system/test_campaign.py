"""Campaigns end to end: the real `meterota campaign` CLI over simulated direct
devices and concentrators (all device code under MicroPython), the ledger in
a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import BIN, Images, db_ready, run_cli, sim_client
from meterota.concentrator import Concentrator
from meterota.confirm import verify
from meterota.lab.fleet import Fleet, FleetOptions, concentrator_id, meter_id
from meterota.image import parse
from meterota.campaign.ledger import Ledger
from meterota.lab.sim import SimDevice
from meterota.store import Store


@pytest.fixture
def db(db_target: str) -> str:
    """The records database: each test runs on SQLite and on PostgreSQL."""
    return db_target


pytestmark = pytest.mark.usefixtures("sim_only")


def register(db: str, devices: list[SimDevice]) -> None:
    with Store(db) as st:
        for d in devices:
            st.set_key(d.device_id, d.key)


def device_info(dev: SimDevice) -> dict[str, Any]:
    c = sim_client(dev, negotiate=False)
    try:
        return dict(c.device_info or {})
    finally:
        c.t.close()


def write_plan(path: Path, image: Path, groups: list[dict[str, Any]], **campaign: Any) -> Path:
    """A PLAN.toml as a user writes it (TOML text, not a Python structure)."""
    lines = ["[campaign]", f'name = "{campaign.pop("name", "test")}"', f'image = "{image}"']
    for k, v in campaign.items():
        if isinstance(v, dict):
            continue
        lines.append(f"{k} = {json.dumps(v)}")
    for k, v in campaign.items():
        if isinstance(v, dict):
            lines.append(f"[campaign.{k}]")
            lines += [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
    for g in groups:
        lines.append("[[group]]")
        lines.append(f'name = "{g["name"]}"')
        if "success_threshold" in g:
            lines.append(f"success_threshold = {g['success_threshold']}")
        lines.append(f"devices = {json.dumps(g.get('devices', []))}")
        for c in g.get("concentrators", []):
            lines.append("[[group.concentrators]]")
            lines.append(f'address = "{c["address"]}"')
            if "meters" in c:
                lines.append(f"meters = {json.dumps(c['meters'])}")
    path.write_text("\n".join(lines) + "\n")
    return path


def campaign(db: str, *args: str, check: bool | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_cli("meterota", "--db", str(db), "campaign", *args, check=check, timeout=timeout)


def ledger_rows(db: str, cid: str) -> dict[str, dict[str, Any]]:
    with Store(db) as st:
        return {r["device"] or r["target"]: r for r in Ledger(st).devices(cid)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two concentrators x 4 meters: one meter off the network, one whose hardware fails every trial boot."""
    opts = FleetOptions(unreachable={meter_id(1, 4)}, fail_trial={meter_id(2, 4)}, meter_reset_s=8)
    f = Fleet(tmp_path_factory.mktemp("fleet"), 2, 4, opts)
    f.start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def directs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SimDevice]]:
    """Direct devices: d1 on a serial pty, d2..d4 on UDP, d4's hardware fails every trial boot."""
    base = tmp_path_factory.mktemp("directs")
    devs = [SimDevice(base / "d1", device_id="direct-1", transport="serial"),
            SimDevice(base / "d2", device_id="direct-2", transport="udp"),
            SimDevice(base / "d3", device_id="direct-3", transport="udp"),
            SimDevice(base / "d4", device_id="direct-4", transport="udp", extra={"fail_trial": True})]
    try:
        for d in devs:
            d.start()
        yield devs
    finally:
        for d in devs:
            d.stop()


@pytest.mark.pg_core
def test_campaign_with_workorder_closed_by_a_field_upgrade(fleet: Fleet, directs: list[SimDevice],
                                                          images: Images, tmp_path: Path, db: str) -> None:
    register(db, fleet.meters + fleet.concentrators + directs)
    image = images.app("1.1.0")
    h = parse(image.read_bytes()).hash
    plan = write_plan(tmp_path / "plan.toml", image, [
        {"name": "pilot", "success_threshold": 1.0, "devices": [directs[0].address, directs[1].address]},
        {"name": "rollout", "concentrators": [{"address": c.address} for c in fleet.concentrators]},
    ], concurrency=3, retry_delay=1, retries={"unreachable": 1})
    p = campaign(db, "run", str(plan), "--id", "c1", "--json")
    assert p.returncode == 5, p.stderr  # finished, with failures
    doc = json.loads(p.stdout)
    assert doc["state"] == "done" and doc["counts"] == {"OK": 8, "KO": 1, "UNREACHABLE": 1}
    assert doc["workorders"] == 2
    rows = ledger_rows(db, "c1")
    for d in ("direct-1", "direct-2", meter_id(1, 1), meter_id(2, 3)):
        r = rows[d]
        assert r["state"] == "OK" and r["verified"] and r["from_version"] == "1.0.0+0"
        conf = verify(bytes(r["record"]), bytes(r["mac"]), fleet_key(fleet, directs, d), device_id=d, image_hash=h)
        assert conf.result == "OK"
    assert rows[meter_id(1, 4)]["state"] == "UNREACHABLE" and rows[meter_id(1, 4)]["via"] == concentrator_id(1)
    ko = rows[meter_id(2, 4)]
    assert ko["state"] == "KO" and "simulated hardware fault" in ko["reason"] and ko["verified"]
    # The groups ran in order: the pilot finished before the rollout's first attempt.
    assert max(rows[d]["finished"] for d in ("direct-1", "direct-2")) <= min(
        r["first_attempt"] for r in rows.values() if r["grp"] == "rollout")

    wo = run_cli("meterota", "--db", str(db), "workorders", "--campaign", "c1", "--format", "json", check=True)
    orders = {w["device"]: w for w in json.loads(wo.stdout)}
    assert set(orders) == {meter_id(1, 4), meter_id(2, 4)}
    assert orders[meter_id(1, 4)]["concentrator"] == concentrator_id(1)
    assert orders[meter_id(1, 4)]["result"] == "UNREACHABLE" and orders[meter_id(1, 4)]["last_seen"] is None
    assert orders[meter_id(2, 4)]["result"] == "KO" and orders[meter_id(2, 4)]["last_seen"]
    csv_text = run_cli("meterota", "--db", str(db), "workorders", check=True).stdout
    assert csv_text.splitlines()[0].startswith("id,campaign,device,concentrator")
    assert len(csv_text.splitlines()) == 3

    # The technician finds the meter off the network and upgrades it on site
    # through its optical port (a serial link of its own).
    onsite = SimDevice(tmp_path / "onsite", device_id=meter_id(1, 4), transport="serial")
    onsite.start()
    try:
        register(db, [onsite])
        port = onsite.address[len("serial:"):]
        up = run_cli("meterota", "--db", str(db), "upgrade", "--port", port, str(image), "--campaign", "c1")
        assert up.returncode == 0, up.stderr
        assert "work order 1 closed" in up.stderr or "closed" in up.stderr
    finally:
        onsite.stop()
    rows = ledger_rows(db, "c1")
    fixed = rows[meter_id(1, 4)]
    assert fixed["state"] == "OK" and fixed["source"] == "field" and fixed["verified"]
    left = json.loads(run_cli("meterota", "--db", str(db), "workorders", "--state", "all", "--json",
                              check=True).stdout)
    by_dev = {w["device"]: w for w in left}
    assert by_dev[meter_id(1, 4)]["state"] == "closed" and by_dev[meter_id(1, 4)]["closed_by"]
    assert by_dev[meter_id(2, 4)]["state"] == "open"
    st = json.loads(campaign(db, "status", "c1", "--json", check=True).stdout)
    assert st["counts"] == {"OK": 9, "KO": 1} and st["workorders"] == {"open": 1, "closed": 1}
    assert st["concentrators"][concentrator_id(1)] == {"OK": 4}

    # The real campaign's exports: the CIM XML validates against our schema,
    # one event per device; the report is written where asked.
    import xmlschema

    from meterota.campaign.export import schema_path

    cim = tmp_path / "c1.xml"
    run_cli("meterota", "--db", str(db), "export", "c1", "--format", "cim", "-o", str(cim), check=True)
    schema = xmlschema.XMLSchema(str(schema_path()))
    schema.validate(str(cim))
    assert cim.read_text().count("<EndDeviceEvent>") == 10
    rows_csv = run_cli("meterota", "--db", str(db), "export", "c1", check=True).stdout.splitlines()
    assert len(rows_csv) == 11
    html = tmp_path / "c1.html"
    rep = run_cli("meterota", "--db", str(db), "report", "c1", "-o", str(html), check=True)
    assert rep.stdout.strip() == str(html.resolve()) and "c1" in html.read_text()


def test_operator_abort_cancels_the_concentrator_job(fleet: Fleet, images: Images, tmp_path: Path, db: str) -> None:
    register(db, fleet.meters + fleet.concentrators)
    conc = fleet.concentrators[1]
    plan = write_plan(tmp_path / "plan.toml", images.app("1.2.0"), [
        {"name": "g", "concentrators": [{"address": conc.address}]}])
    proc = subprocess.Popen([str(BIN / "meterota"), "--db", str(db), "campaign", "run", str(plan), "--id", "ab",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(r["state"] == "OK" for r in (ledger_rows(db, "ab") if db_ready(db) else {}).values()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)  # polling the ledger for the first result; not synchronisation
        listed = run_cli("meterota", "--db", str(db), "campaign", "list", check=True).stdout
        assert listed.startswith("ab ") and " running " in listed
        a = campaign(db, "abort", "ab", "--reason", "wrong image", check=True)
        assert "running campaign process" in a.stdout
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 9, err
    doc = json.loads(out)
    assert doc["state"] == "aborted" and doc["reason"] == "wrong image"
    rows = ledger_rows(db, "ab")
    assert {r["state"] for r in rows.values()} <= {"OK", "KO", "CANCELLED"} and any(
        r["state"] == "CANCELLED" for r in rows.values()), rows
    c = sim_client(conc)
    try:
        assert Concentrator(c).status()[-1]["state"] == "cancelled"
    finally:
        c.t.close()


def test_ctrl_c_leaves_the_campaign_resumable(fleet: Fleet, images: Images, tmp_path: Path, db: str) -> None:
    register(db, fleet.meters + fleet.concentrators)
    conc = fleet.concentrators[0]
    plan = write_plan(tmp_path / "plan.toml", images.app("1.3.0"), [
        {"name": "g", "concentrators": [{"address": conc.address}]}], retries={"unreachable": 1})
    # Ctrl-C as a terminal delivers it: a shell starts background jobs with SIGINT ignored and
    # Python keeps that for its children, so `make test` run in the background saw the campaign
    # run on to its end (exit 5, not 130).
    proc = subprocess.Popen([str(BIN / "meterota"), "--db", str(db), "campaign", "run", str(plan), "--id", "int"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not any(r["state"] == "OK" for r in (ledger_rows(db, "int") if db_ready(db) else {}).values()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)  # polling the ledger for the first result; not synchronisation
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "campaign resume int" in err, err
    with Store(db) as st:
        led = Ledger(st)
        c = led.campaign("int")
        assert c is not None and c["state"] == "running"
        assert [(j["round"], j["state"]) for j in led.jobs("int")] == [(0, "running")]  # not cancelled
    p = campaign(db, "resume", "int", "--json")
    assert p.returncode == 5, p.stderr  # the meter off the network is the one failure
    assert json.loads(p.stdout)["counts"] == {"OK": 3, "UNREACHABLE": 1}


def fleet_key(fleet: Fleet, directs: list[SimDevice], device: str) -> bytes:
    return next(d.key for d in fleet.meters + directs if d.device_id == device)


def test_abort_threshold_stops_the_phased_rollout(directs: list[SimDevice], images: Images, tmp_path: Path, db: str) -> None:
    register(db, directs)
    d1, d2, d3, d4 = directs
    boots_before = {d.device_id: device_info(d)["boots"] for d in (d2, d3)}
    # d4 fails its trial boot; with one device at a time and an abort at 50 %
    # once 1 device finished, the campaign stops right after it.
    plan = write_plan(tmp_path / "plan.toml", images.app("1.2.0"), [
        {"name": "canary", "devices": [d4.address, d2.address]},
        {"name": "rest", "devices": [d3.address]},
    ], concurrency=1, abort={"threshold": 0.5, "min_finished": 1})
    p = campaign(db, "run", str(plan), "--id", "c2", "--json")
    assert p.returncode == 9, p.stderr
    doc = json.loads(p.stdout)
    assert doc["state"] == "aborted" and "abort threshold" in doc["reason"]
    rows = ledger_rows(db, "c2")
    assert rows["direct-4"]["state"] == "KO"
    assert rows[d2.address]["state"] == "CANCELLED" and rows[d2.address]["attempts"] == 0
    assert rows[d3.address]["state"] == "CANCELLED" and rows[d3.address]["attempts"] == 0
    # Nothing touched the devices the abort spared.
    assert {d.device_id: device_info(d)["boots"] for d in (d2, d3)} == boots_before


def test_success_threshold_gates_the_next_group(directs: list[SimDevice], images: Images, tmp_path: Path, db: str) -> None:
    register(db, directs)
    d1, d2, d3, d4 = directs
    boots = device_info(d3)["boots"]
    plan = write_plan(tmp_path / "plan.toml", images.app("1.3.0"), [
        {"name": "pilot", "success_threshold": 0.9, "devices": [d2.address, d4.address]},
        {"name": "rest", "devices": [d3.address]},
    ], concurrency=2)
    p = campaign(db, "run", str(plan), "--id", "c3", "--json")
    assert p.returncode == 9, p.stderr
    doc = json.loads(p.stdout)
    assert doc["state"] == "halted" and "below its success threshold of 90%" in doc["reason"]
    rows = ledger_rows(db, "c3")
    assert rows["direct-2"]["state"] == "OK" and rows["direct-4"]["state"] == "KO"
    assert rows[d3.address]["state"] == "CANCELLED" and device_info(d3)["boots"] == boots
    # KO after all retries: a work order, even though the campaign halted.
    wo = json.loads(run_cli("meterota", "--db", str(db), "workorders", "--json", check=True).stdout)
    assert [w["device"] for w in wo] == ["direct-4"]


def test_time_window_is_respected(directs: list[SimDevice], images: Images, tmp_path: Path, db: str) -> None:
    register(db, directs)
    d3 = directs[2]
    image = images.app("1.4.0")
    # A window that has closed: nothing is attempted.
    closed = write_plan(tmp_path / "closed.toml", image, [{"name": "g", "devices": [d3.address]}],
                        not_after=int(time.time()) - 60)
    boots = device_info(d3)["boots"]
    p = campaign(db, "run", str(closed), "--id", "late", "--json")
    assert p.returncode == 9 and json.loads(p.stdout)["state"] == "expired"
    assert ledger_rows(db, "late")[d3.address]["attempts"] == 0 and device_info(d3)["boots"] == boots
    # A worker given that ended campaign has nothing to do: --until-idle returns at once.
    w = campaign(db, "worker", "--campaign", "late", "--until-idle", timeout=60)
    assert w.returncode == 0, w.stderr
    # A window opening in 3 s: the campaign waits for it.
    opens = time.time() + 3
    later = write_plan(tmp_path / "later.toml", image, [{"name": "g", "devices": [d3.address]}],
                       not_before=opens)
    p = campaign(db, "run", str(later), "--id", "soon", "--json")
    assert p.returncode == 0, p.stderr
    row = ledger_rows(db, "soon")["direct-3"]
    assert row["state"] == "OK" and row["first_attempt"] >= opens


@pytest.mark.pg_core
def test_host_killed_mid_campaign_resumes_without_upgrading_twice(images: Images, tmp_path: Path, db: str) -> None:
    # One meter at a time (parallel=1): the kill must land mid-job, after one meter and before all.
    f = Fleet(tmp_path / "f", 1, 5, FleetOptions(meter_reset_s=8, parallel=1))
    directs = [SimDevice(tmp_path / f"k{i}", device_id=f"direct-k{i}", transport="udp") for i in (1, 2)]
    f.start()
    try:
        for d in directs:
            d.start()
            register(db, f.meters + f.concentrators + directs)
        plan = write_plan(tmp_path / "plan.toml", images.app("1.1.0"), [
            {"name": "direct", "devices": [d.address for d in directs]},
            {"name": "meters", "concentrators": [{"address": f.concentrators[0].address}]},
        ], concurrency=1)
        proc = subprocess.Popen([str(BIN / "meterota"), "--db", str(db), "campaign", "run", str(plan), "--id", "k"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        # Kill it once both direct devices are done and a meter of the job is done: mid-job.
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            rows = ledger_rows(db, "k") if db_ready(db) else {}
            if sum(r["state"] == "OK" and r["kind"] == "meter" for r in rows.values()) >= 1:
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.1)  # polling the ledger for the moment to kill; not synchronisation
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        before = ledger_rows(db, "k")
        done_before = {k for k, r in before.items() if r["state"] == "OK"}
        assert done_before and len(done_before) < 7
        boots = {d.device_id: device_info(d)["boots"] for d in f.meters + directs if d.device_id in done_before}

        p = campaign(db, "resume", "k", "--json")
        assert p.returncode == 0, p.stderr
        rows = ledger_rows(db, "k")
        assert all(r["state"] == "OK" and r["verified"] for r in rows.values()), rows
        # No device was upgraded twice: those done before the kill did not
        # even reboot, and every device holds exactly one confirmation record.
        assert {d.device_id: device_info(d)["boots"] for d in f.meters + directs if d.device_id in done_before} == boots
        for d in f.meters + directs:
            assert verify(bytes(rows[d.device_id]["record"]), bytes(rows[d.device_id]["mac"]), d.key).seq == 1
        # The resumed host followed the concentrator's job instead of starting another.
        with Store(db) as st:
            jobs = Ledger(st).jobs("k")
        assert [(j["round"], j["job"]) for j in jobs] == [(0, 1)]
        c = sim_client(f.concentrators[0])
        assert [j["job"] for j in Concentrator(c).status()] == [1]
        c.t.close()
    finally:
        f.stop()
        for d in directs:
            d.stop()
