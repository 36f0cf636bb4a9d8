"""Hostile cases (issue 15, truthfulness and nothing lost): the real CLI as a
subprocess over simulated devices, the records in a real SQLite file. The
promise under test: OK only with a verified, fresh confirmation record; every
outcome a device reached recorded once; a device flashed once; one owner per
campaign."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import cbor2
import pytest

from conftest import BIN, Images, port_of, run_cli, sim_client
from meterota import image as img
from meterota.boards import unix_slot_size
from meterota.campaign.ledger import Ledger
from meterota.concentrator import Concentrator, record_results
from meterota.image import parse
from meterota.lab.faults import UDPFaultProxy
from meterota.lab.fleet import Fleet, FleetOptions, meter_id
from meterota.lab.sim import SimDevice
from meterota.protocol import HEADER, Header
from meterota.store import Store


# README "Exit codes" (spelled out, so this suite also runs against older trees to show what failed there).
EXIT_USAGE, EXIT_CONFIRMATION, EXIT_NOT_RECORDED, EXIT_BUSY = 2, 6, 10, 11


pytestmark = pytest.mark.usefixtures("sim_only")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "records.db"


def meterota(db: Path, *args: str, check: bool | None = None, timeout: float = 120,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("meterota", "--db", str(db), *args, check=check, timeout=timeout, env=env)


def register(db: Path, devices: list[SimDevice], key: bytes | None = None) -> None:
    with Store(db) as st:
        for d in devices:
            st.set_key(d.device_id, key or d.key)


def rows(db: Path, where: str = "1=1", args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(f"SELECT * FROM upgrades WHERE {where} ORDER BY id", args)]
    finally:
        con.close()


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The failure is one readable line, never a traceback."""
    assert "Traceback" not in r.stderr, r.stderr
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("meterota: ")]
    assert len(errs) == 1, r.stderr
    return errs[0]


def upgrade_behind_the_host(dev: SimDevice, data: bytes) -> None:
    """Upgrade a device the way a host that was killed after the confirm leaves
    it: done on the device, its record never taken into the records."""
    h = parse(data).hash
    c = sim_client(dev)
    try:
        c.upload(data)
        c.image_test(h)
        gen = dev.ready_generation()
        c.reset()
        dev.wait_ready(after=gen)
        c.image_confirm()
    finally:
        c.t.close()


# -- 1. a wrong key never gives OK, also when the device already runs the image ----------------------
def test_wrong_key_on_an_already_running_image_is_not_ok_and_closes_no_work_order(
        make_device: Callable[..., SimDevice], images: Images, db: Path) -> None:
    dev = make_device("udp")
    register(db, [dev])
    app = images.app("1.1.0")
    meterota(db, "upgrade", *port_of(dev), str(app), check=True)
    assert [r["result"] for r in rows(db)] == ["OK"]
    h = parse(app.read_bytes()).hash.hex()
    # A campaign left a work order open for this device.
    with Store(db) as st:
        led = Ledger(st)
        led.create_campaign("wo", "wo", {}, None, h, "1.1.0+0")
        led.add_target("wo", dev.device_id, "g", "direct", device=dev.device_id, image_hash=h, version="1.1.0+0")
        led.finish_device("wo", dev.device_id, "UNREACHABLE", "silent", final=True)
        assert led.open_workorder("wo", led.device_row("wo", dev.device_id) or {}, "1.1.0+0")
    # The registry now holds a wrong key for it (a swapped board, a typo).
    wrong = bytes(range(32))
    for extra in ([], ["--campaign", "wo"]):
        register(db, [dev], key=wrong)
        r = meterota(db, "--json", "upgrade", *port_of(dev), str(app), *extra)
        assert r.returncode == EXIT_CONFIRMATION, (r.returncode, r.stdout, r.stderr)
        assert "MAC does not verify" in one_line_error(r)
        # ... and with the right key passed explicitly, a wrong one on the command line.
        r = meterota(db, "upgrade", *port_of(dev), str(app), "--key", wrong.hex(), *extra)
        assert r.returncode == EXIT_CONFIRMATION, r.stderr
    assert [r["result"] for r in rows(db) if r["result"] == "OK"] == ["OK"]
    assert all(r["verified"] for r in rows(db) if r["result"] == "OK")
    with Store(db) as st:
        (wo,) = Ledger(st).workorders("wo")
        assert wo["state"] == "open"
        assert Ledger(st).device_row("wo", dev.device_id)["state"] != "OK"  # type: ignore[index]
    # A campaign over it counts no OK either: the device ends ERROR (its work order says why).
    plan = db.with_name("plan.toml")
    plan.write_text(f'[campaign]\nname = "x"\nimage = "{app}"\n[[group]]\nname = "a"\ndevices = ["{dev.address}"]\n')
    r = meterota(db, "--json", "campaign", "run", str(plan), "--id", "c")
    assert r.returncode == 5 and json.loads(r.stdout)["counts"] == {"ERROR": 1}, (r.stdout, r.stderr)
    assert [r["result"] for r in rows(db) if r["result"] == "OK"] == ["OK"]


# -- 2. freshness: replays refused, results recorded once, no double OK ---------------------------------
class ReplayProxy:
    """A man in the middle on UDP: it records the device's info and
    confirmation replies, and later answers those old (genuine) bodies in place
    of the current ones."""

    WANTED = {(64, 0), (64, 1)}  # meterota info, confirmation record

    def __init__(self, device: tuple[str, int]):
        self.device = device
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.up.connect(device)
        self.captured: dict[tuple[int, int], bytes] = {}
        self.replay = False
        self.client: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock, self.up], [], [], 0.2)
            for s in ready:
                try:
                    data, addr = s.recvfrom(65535)
                except OSError:  # ICMP unreachable while the device resets
                    continue
                if s is self.sock:
                    self.client = addr
                    self.up.send(data)
                    continue
                h = Header.unpack(data)
                k = (h.group, h.cmd)
                if k in self.WANTED and h.op in (1, 3):
                    if self.replay and k in self.captured:
                        body = self.captured[k]
                        data = HEADER.pack(data[0], h.flags, len(body), h.group, h.seq, h.cmd) + body
                    elif not self.replay:
                        self.captured[k] = data[8:]
                if self.client:
                    self.sock.sendto(data, self.client)

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self.sock.close()
        self.up.close()


def test_replayed_old_record_with_a_doctored_info_reply_is_refused(make_device: Callable[..., SimDevice],
                                                                   images: Images, db: Path) -> None:
    dev = make_device("udp")
    register(db, [dev])
    host, port = dev.address[len("udp:"):].rsplit(":", 1)
    mitm = ReplayProxy((host, int(port)))
    try:
        old, new = images.app("1.1.0"), images.app("1.2.0")
        meterota(db, "upgrade", "--udp", f"127.0.0.1:{mitm.port}", str(old), check=True)
        meterota(db, "info", "--udp", f"127.0.0.1:{mitm.port}", check=True)  # the proxy keeps the confirmed state
        assert mitm.captured.get((64, 1)), "the proxy saw the record"
        assert not cbor2.loads(mitm.captured[(64, 0)]).get("trial")
        meterota(db, "upgrade", *port_of(dev), str(new), check=True)
        # The attacker answers the 1.1.0 state and its genuine record #1 in place of 1.2.0 and #2.
        mitm.replay = True
        r = meterota(db, "upgrade", "--udp", f"127.0.0.1:{mitm.port}", str(old), "--allow-downgrade")
    finally:
        mitm.close()
    assert r.returncode == EXIT_CONFIRMATION, (r.stdout, r.stderr)
    assert "replay" in one_line_error(r)
    assert [(x["to_version"], x["result"]) for x in rows(db) if x["result"] == "OK"] == [
        ("1.1.0+0", "OK"), ("1.2.0+0", "OK")]


def test_racing_hosts_record_one_ok_per_record(make_device: Callable[..., SimDevice], images: Images,
                                               db: Path) -> None:
    """Two hosts finish one device's upgrade at once (its record not yet in
    the records): one row, not two with the same record number; both succeed."""
    dev = make_device("udp")
    register(db, [dev])
    app = images.app("1.3.0")
    upgrade_behind_the_host(dev, app.read_bytes())
    procs = [subprocess.Popen([str(BIN / "meterota"), "--db", str(db), "--json", "upgrade", *port_of(dev), str(app)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    ok = rows(db, "result='OK'")
    assert len(ok) == 1 and ok[0]["verified"] == 1, ok
    ids = {json.loads(o)["record_id"] for o, _ in outs}
    assert ids == {ok[0]["id"]}
    # Again, one after the other: still that one row.
    meterota(db, "upgrade", *port_of(dev), str(app), check=True)
    assert len(rows(db, "result='OK'")) == 1


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One concentrator, three meters: the second on a slow link, the third off the network; one
    meter at a time (parallel=1), so the slow one is still in flight after the first's result."""
    f = Fleet(tmp_path_factory.mktemp("fleet"), 1, 3, FleetOptions(unreachable={meter_id(1, 3)}, slow={meter_id(1, 2)},
                                                                   meter_reset_s=3, parallel=1))
    f.start()
    yield f
    f.stop()


def conc_args(fleet: Fleet) -> list[str]:
    return port_of(fleet.concentrators[0])


def test_job_results_read_again_record_nothing_twice_and_replays_are_refused(
        fleet: Fleet, images: Images, db: Path) -> None:
    register(db, fleet.meters)
    app = images.app("1.4.0")
    data = app.read_bytes()
    info = parse(data)
    r = meterota(db, "--json", "job", "create", *conc_args(fleet), str(app), "--wait", "--meters",
                 f"{meter_id(1, 1)},{meter_id(1, 3)}", "--job-retries", "0", "--duration", "120")
    assert r.returncode == 3, r.stderr  # the unreachable meter
    job = json.loads(r.stdout)["job"]
    first = rows(db)
    assert sorted((x["device"], x["result"]) for x in first) == [(meter_id(1, 1), "OK"), (meter_id(1, 3), "UNREACHABLE")]
    for _ in range(2):
        again = meterota(db, "--json", "job", "results", *conc_args(fleet), str(job))
        assert again.returncode == 3, again.stderr
    assert rows(db) == first  # nothing recorded twice; the meter's newest row is still its OK
    assert {x.get("recorded") for x in json.loads(again.stdout)["results"]} == {"already"}
    # A concentrator relaying that job's genuine record again as a later job's, after the meter moved on:
    m1 = next(d for d in fleet.meters if d.device_id == meter_id(1, 1))
    meterota(db, "upgrade", *port_of(m1), str(images.app("1.5.0")), check=True)
    c = sim_client(fleet.concentrators[0])
    try:
        old = [e for e in Concentrator(c).results(job) if e["meter"] == meter_id(1, 1)]
    finally:
        c.t.close()
    with Store(db) as st:
        (row,) = record_results(old, st, info.hash, info.version_str, "replayer", conc_id="replayer", job=999)
    assert row["result"] == "ERROR" and "replay" in row["reason"] and not row["verified"]
    assert [x["to_version"] for x in rows(db, "device=? AND result='OK'", (meter_id(1, 1),))] == ["1.4.0+0", "1.5.0+0"]


# -- 3. one device named two ways is one target ------------------------------------------------------
def test_aliases_of_one_target_are_refused_in_a_plan(make_device: Callable[..., SimDevice], images: Images,
                                                     tmp_path: Path, db: Path) -> None:
    dev = make_device("serial")
    pty = dev.address[len("serial:"):]
    link = tmp_path / "meter-probe"
    link.symlink_to(pty)
    app = images.app("1.1.0")
    for a, b in [(pty, f"serial:{pty}"), (pty, pty.replace("/dev/", "/dev/../dev/")), (pty, str(link)),
                 ("udp:127.0.0.9", "udp:127.0.0.9:1337"), ("udp:localhost:1340", "udp:127.0.0.1:1340")]:
        plan = tmp_path / "plan.toml"
        plan.write_text(f'[campaign]\nname = "x"\nimage = "{app}"\n[[group]]\nname = "a"\ndevices = ["{a}"]\n'
                        f'[[group]]\nname = "b"\ndevices = ["{b}"]\n')
        r = meterota(db, "campaign", "run", str(plan))
        assert r.returncode == EXIT_USAGE, (a, b, r.stderr)
        assert "already a target" in one_line_error(r)
    assert not rows(db) if db.exists() else True


def test_two_addresses_answering_one_device_id_flash_it_once(make_device: Callable[..., SimDevice], images: Images,
                                                             tmp_path: Path, db: Path) -> None:
    dev = make_device("udp")
    register(db, [dev])
    app = images.app("1.1.0")
    with UDPFaultProxy(None, dev.address[len("udp:"):]) as relay:  # a second address of the same device
        plan = tmp_path / "plan.toml"
        plan.write_text(f'[campaign]\nname = "x"\nimage = "{app}"\nconcurrency = 2\n[[group]]\nname = "a"\n'
                        f'devices = ["{dev.address}", "{relay.address}"]\n')
        r = meterota(db, "--json", "campaign", "run", str(plan), "--id", "alias")
    assert r.returncode == 0, r.stderr
    with Store(db) as st:
        states = sorted((x["state"], x["reason"] or "") for x in Ledger(st).devices("alias"))
    assert [s for s, _ in states] == ["CANCELLED", "OK"], states
    assert "not upgraded a second time" in states[0][1]
    assert len(rows(db, "result='OK'")) == 1
    c = sim_client(dev)
    try:
        slots = {e["slot"]: e for e in c.image_state()}
    finally:
        c.t.close()
    assert slots[1]["version"].startswith("1.0.0"), "the fallback slot still holds the previous image"


# -- 4. a write-locked records database loses nothing --------------------------------------------------
def test_locked_database_spools_the_outcome_and_import_records_it(make_device: Callable[..., SimDevice],
                                                                  images: Images, db: Path) -> None:
    dev = make_device("serial")
    register(db, [dev])
    app = images.app("1.1.0")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another program holds the write lock throughout the upgrade
    try:
        r = meterota(db, "upgrade", *port_of(dev), str(app), env={"METEROTA_DB_WAIT": "1"})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.returncode == EXIT_NOT_RECORDED, (r.stdout, r.stderr)
    line = one_line_error(r)
    assert "OK NOT RECORDED" in line and "records import" in line
    assert rows(db) == []
    spool = db.with_name(db.name + ".spool")
    assert spool.exists()
    out = meterota(db, "records", "import", check=True)
    assert "1 outcomes imported" in out.stdout
    (row,) = rows(db)
    assert row["result"] == "OK" and row["verified"] == 1 and row["to_version"] == "1.1.0+0"
    assert not spool.exists()
    # Imported twice (a copy kept by hand): recognised, not recorded again.
    assert meterota(db, "upgrade", *port_of(dev), str(app), check=True).returncode == 0
    assert len(rows(db)) == 1


# -- 5. after an abort the ledger follows what the cancelled job did --------------------------------------
def test_abort_during_a_job_keeps_what_the_job_did(fleet: Fleet, images: Images, tmp_path: Path, db: Path) -> None:
    register(db, fleet.meters)
    app = images.app("1.6.0")
    h = parse(app.read_bytes()).hash
    conc = fleet.concentrators[0]
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[campaign]\nname = "x"\nimage = "{app}"\n[campaign.retries]\nunreachable = 0\n'
                    f'[[group]]\nname = "a"\n[[group.concentrators]]\naddress = "{conc.address}"\n'
                    f'meters = ["{meter_id(1, 1)}", "{meter_id(1, 2)}"]\n')
    proc = subprocess.Popen([str(BIN / "meterota"), "--db", str(db), "campaign", "run", str(plan), "--id", "ab",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(r["result"] == "OK" for r in (rows(db) if db.exists() else [])):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)  # polling the records for the first result; not synchronisation
        meterota(db, "campaign", "abort", "ab", check=True)  # the second (slow) meter is in flight
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 9, err
    with Store(db) as st:
        ledger = {r["target"]: r for r in Ledger(st).devices("ab")}
    # The abort came after the first meter's OK, while the (slow) second one was in flight: the
    # concentrator finishes that attempt, so both meters end on the image; the ledger must say so.
    for m in fleet.meters[:2]:
        c = sim_client(m)
        try:
            deadline = time.monotonic() + 60
            while True:
                info = c.info()
                if not info.get("trial") and any(s.get("active") and s.get("hash") == h for s in info["slots"]):
                    break
                assert time.monotonic() < deadline, (m.device_id, info, ledger[m.device_id])
                time.sleep(0.1)  # polling the meter until its cancelled job's attempt is over; not synchronisation
        finally:
            c.t.close()
        assert ledger[m.device_id]["state"] == "OK" and ledger[m.device_id]["verified"] == 1, ledger[m.device_id]


def test_abort_after_the_runner_died_takes_in_what_the_job_did(fleet: Fleet, images: Images, tmp_path: Path,
                                                               db: Path) -> None:
    """No campaign process left (killed): `campaign abort` cancels the job itself, waits for the meter
    in flight, and records what the job did before the rest become CANCELLED."""
    register(db, fleet.meters)
    app = images.app("1.8.0")
    h = parse(app.read_bytes()).hash
    conc = fleet.concentrators[0]
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[campaign]\nname = "x"\nimage = "{app}"\n[[group]]\nname = "a"\n[[group.concentrators]]\n'
                    f'address = "{conc.address}"\nmeters = ["{meter_id(1, 1)}", "{meter_id(1, 2)}"]\n')
    proc = subprocess.Popen([str(BIN / "meterota"), "--db", str(db), "campaign", "run", str(plan), "--id", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            with Store(db) as st:
                if any(j["job"] is not None for j in Ledger(st).jobs("k")):
                    break
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)  # polling the ledger for the job's id; not synchronisation
    finally:
        proc.kill()
        proc.wait()
    a = meterota(db, "campaign", "abort", "k", check=True)
    assert "cancelled" in a.stdout and "running campaign process" not in a.stdout, a.stdout
    with Store(db) as st:
        ledger = {r["target"]: r for r in Ledger(st).devices("k")}
    first = fleet.meters[0]  # the job's first meter: in flight when the host died, or not yet started
    c = sim_client(first)
    try:
        deadline = time.monotonic() + 60
        while True:
            info = c.info()
            if not info.get("trial"):
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.1)  # polling the meter until the cancelled job's attempt is over; not synchronisation
    finally:
        c.t.close()
    upgraded = any(s.get("active") and s.get("hash") == h for s in info["slots"])
    oks = [r["result"] for r in rows(db, "device=? AND to_version='1.8.0+0'", (first.device_id,))]
    if upgraded:  # the usual case: the job had the meter in flight, and its verified OK was taken in
        assert ledger[first.device_id]["state"] == "OK" and ledger[first.device_id]["verified"] == 1, ledger
        assert oks == ["OK"]
    else:  # the cancel reached the concentrator before it started the meter: nothing happened to it
        assert ledger[first.device_id]["state"] == "CANCELLED" and oks == [], ledger
    second = ledger[meter_id(1, 2)]
    assert second["state"] in ("OK", "CANCELLED"), ledger


# -- 8. `meterota sim` never loses its device lines --------------------------------------------------------
def test_image_signing_in_threads_keeps_stdout(tmp_path: Path) -> None:
    bundle = img.build_bundle({"app.py": b"print('x')\n"})
    real = sys.stdout
    seen = io.StringIO()
    sys.stdout = seen
    try:
        for _ in range(3):
            barrier = threading.Barrier(8)

            def sign() -> None:
                barrier.wait()
                img.sign(bundle, "1.0.0", slot_size=unix_slot_size())

            ts = [threading.Thread(target=sign) for _ in range(8)]
            for t in ts:
                t.start()
            print("device line")  # the main thread's output while the others sign
            for t in ts:
                t.join()
            assert sys.stdout is seen
        print("after")
    finally:
        sys.stdout = real
    assert seen.getvalue().count("device line") == 3 and "after" in seen.getvalue()
    assert "sign the" not in seen.getvalue()


def test_sim_prints_every_device_line(tmp_path: Path) -> None:
    proc = subprocess.Popen([str(BIN / "meterota"), "sim", "--transport", "udp", "--count", "4", "--dir",
                             str(tmp_path / "sim")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = b""
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + 60
        while out.count(b"\n") < 4 and time.monotonic() < deadline:
            if select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                out += chunk
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    lines = out.decode().splitlines()
    assert len(lines) == 4 and all(len(ln.split()) == 3 and ln.split()[1].startswith("udp:") for ln in lines), lines


# -- 9. one process runs a campaign -------------------------------------------------------------------
def direct_plan(tmp_path: Path, image: Path, dev: SimDevice) -> Path:
    p = tmp_path / "plan.toml"
    p.write_text(f'[campaign]\nname = "x"\nimage = "{image}"\n[[group]]\nname = "a"\ndevices = ["{dev.address}"]\n')
    return p


def test_three_runs_of_one_campaign_id_one_owner(make_device: Callable[..., SimDevice], images: Images,
                                                 tmp_path: Path, db: Path) -> None:
    dev = make_device("serial", bytes_per_second=20000)  # the owner's upgrade lasts while the others start
    register(db, [dev])
    plan = direct_plan(tmp_path, images.app("1.1.0"), dev)
    procs = [subprocess.Popen([str(BIN / "meterota"), "--db", str(db), "campaign", "run", str(plan), "--id", "x"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, EXIT_BUSY, EXIT_BUSY], (codes, outs)
    for p, (out, err) in zip(procs, outs):
        if p.returncode:
            line = one_line_error(subprocess.CompletedProcess([], p.returncode, out, err))
            assert "campaign x" in line
    assert len(rows(db, "result='OK'")) == 1


def test_stopped_runner_taken_over_stops_when_continued(make_device: Callable[..., SimDevice], images: Images,
                                                       tmp_path: Path, db: Path) -> None:
    dev = make_device("serial", bytes_per_second=20000)  # a slow probe: the upgrade lasts seconds
    register(db, [dev])
    plan = direct_plan(tmp_path, images.app("1.7.0"), dev)
    env = dict(os.environ, METEROTA_LEASE_S="2")
    a = subprocess.Popen([str(BIN / "meterota"), "-v", "--db", str(db), "campaign", "run", str(plan), "--id", "s"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert a.stderr is not None
        for line in a.stderr:
            if "uploading" in line:
                break
        a.send_signal(signal.SIGSTOP)
        # (While A's lease lasts nobody else may run it: test_three_runs_of_one_campaign_id_one_owner.)
        deadline = time.monotonic() + 30
        while True:
            with Store(db) as st:
                units = Ledger(st).units("s")  # A's lease on the campaign's one unit, on the database's clock
            if units and all(u["expires"] is not None and float(u["expires"]) < float(u["now"]) for u in units):
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)  # waiting for A's lease to run out; not synchronisation
        b = meterota(db, "campaign", "resume", "s", env=env, timeout=180)
        assert b.returncode == 0, b.stderr
        a.send_signal(signal.SIGCONT)
        _, err = a.communicate(timeout=120)
    finally:
        a.send_signal(signal.SIGCONT)
        a.kill()
    assert a.returncode == EXIT_BUSY, err
    assert "taken over" in err and "Traceback" not in err
    with Store(db) as st:
        led = Ledger(st)
        assert led.campaign("s")["state"] == "done"  # type: ignore[index]
        (row,) = led.devices("s")
    assert row["state"] == "OK" and row["verified"] == 1
    assert [r["result"] for r in rows(db)] == ["OK"]
