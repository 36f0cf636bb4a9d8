"""`meterota upgrade` and smpmgr through a faulty link (meterota.lab.faults) against simulated devices.

For every fault configuration: the run either completes with the right image or fails cleanly
(non-zero, one `meterota: error:` line, no traceback) in bounded time; the device never reports a
slot whose hash is not one of the images it was given, and what it reports matches the bytes in its
flash; with the fault switched off, a clean `meterota upgrade` on the same device completes
(resuming where the device says). A summary table of all runs is printed at the end.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import Images, port_of, run_cli, smpmgr_target
from meterota import protocol as P
from meterota.boards import layout
from meterota.client import SMPClient
from meterota.lab.faults import FaultShaper, LoseFrames, UDPFaultProxy, make_shaper
from meterota.image import parse
from meterota.lab.sim import SimDevice
from meterota.store import Store
from meterota.transport import from_address

# A faulty run must end by itself well before this (meterota's own retry bounds are far lower);
# hitting it is a hang and fails the test.
RUN_TIMEOUT = 60.0
METEROTA_BOUND = 40.0  # seconds a faulty meterota run may take
SMPMGR_BOUND = 20.0  # smpmgr: no retries, 2 s per request
FAILURE_CODES = {3, 4, 5, 6, 7}  # documented exit codes a link fault can lead to


# --------------------------------------------------------------------------------------------
# The summary table


@dataclass
class Run:
    case: str
    tool: str
    link: str
    fault: str
    hostile: bool
    injected: int = 0
    outcome: str = ""
    seconds: float = 0.0
    after: str = ""
    after_seconds: float = 0.0


@pytest.fixture(scope="session")
def fault_runs(pytestconfig: pytest.Config) -> Iterator[list[Run]]:
    runs: list[Run] = []
    yield runs
    if not runs:
        return
    lines = ["", "link-fault runs (faulty run -> then a clean `meterota upgrade` on the same device; "
             "hostile-*: failure allowed)"]
    hdr = f"{'case':<22} {'tool':<15} {'link':<6} {'fault':<50} {'inj':>4}  {'faulty run':<62} {'s':>5}  " \
          f"{'clean run':<28} {'s':>4}"
    lines += [hdr, "-" * len(hdr)]
    for r in runs:
        lines.append(f"{r.case:<22} {r.tool:<15} {r.link:<6} {r.fault[:50]:<50} {r.injected:>4}  "
                     f"{r.outcome[:62]:<62} {r.seconds:>5.1f}  {r.after[:28]:<28} {r.after_seconds:>4.1f}")
    ok = sum(r.outcome.startswith("OK") for r in runs)
    lines.append(f"{len(runs)} runs: {ok} completed under the fault, {len(runs) - ok} failed cleanly; "
                 f"{sum(r.after.startswith('OK') for r in runs)} clean follow-ups completed")
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print("\n".join(lines))
        return
    with capman.global_and_fixture_disabled():
        print("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "records.db"


def register(db: Path, dev: SimDevice) -> None:
    with Store(db) as st:
        st.set_key(dev.device_id, dev.key)


def clean_client(dev: SimDevice) -> SMPClient:
    """A fault-free in-process client on the device's own address (console framing on serial)."""
    t = from_address(port=dev.address)
    t.open()
    return SMPClient(t, timeout=2.0, retries=3)


def device_info(dev: SimDevice) -> dict[str, Any]:
    c = clean_client(dev)
    try:
        return c.info()
    finally:
        c.t.close()


def image_state(dev: SimDevice) -> list[dict[str, Any]]:
    c = clean_client(dev)
    try:
        return c.image_state()
    finally:
        c.t.close()


def check_nothing_corrupt_is_valid(dev: SimDevice, known: dict[bytes, bytes | None]) -> dict[str, Any]:
    """Every slot the device reports holds one of the known images, byte for byte in its flash;
    the SMP image state agrees. Returns the device info."""
    info = device_info(dev)
    lay = layout("unix")
    flash = (dev.state_dir / "flash.bin").read_bytes()
    for s in info["slots"]:
        h = s.get("hash")
        if h is None:
            continue
        assert h in known, f"slot {s['slot']} reports hash {bytes(h).hex()} of no image we gave it: {s}"
        data = known[h]
        if data is not None:
            off = lay["slot_a" if s["slot"] == "A" else "slot_b"][0]
            assert flash[off:off + len(data)] == data, f"slot {s['slot']} claims an image its flash does not hold"
    for e in image_state(dev):
        assert e["hash"] in known, f"image state lists an unknown hash: {e}"
    return info


def active(info: dict[str, Any]) -> dict[str, Any]:
    (a,) = [s for s in info["slots"] if s.get("active")]
    return a


def meterota(db: Path, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return run_cli("meterota", "--db", str(db), *args, timeout=timeout)


def assert_clean_failure(r: subprocess.CompletedProcess[str]) -> str:
    """A failed meterota run: documented code, exactly one `meterota: error:` line, no traceback."""
    errs = [x for x in r.stderr.splitlines() if x.startswith("meterota: error:")]
    assert r.returncode in FAILURE_CODES, (r.returncode, r.stderr)
    assert len(errs) == 1 and "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    return f"exit {r.returncode}: {errs[0][len('meterota: error: '):]}"


def smpmgr_message(r: subprocess.CompletedProcess[str]) -> str:
    """The gist of smpmgr's (rich) error output, for the summary."""
    lines = [" ".join(x.replace("│", " ").split()) for x in (r.stdout + r.stderr).splitlines()]
    final = [x for x in lines if re.match(r"^[A-Z]\w*(Error|Exception|Sequence|Timeout)\w*: ", x)]
    if final:
        return final[-1][:60]
    text = " ".join(lines)
    m = re.search(r"Timeout \([\d.]+s\) waiting for request", text)
    if m:
        cmd = re.search(r"command_id=<(\w+\.\w+)", text[m.end():])
        return m.group(0).replace("request", cmd.group(1) if cmd else "a reply")[:60]
    m = re.search(r"ERROR\s+(.*)", text)
    if m:
        return m.group(1)[:60]
    return next((x for x in reversed(lines) if x), "")[:60]


def smpmgr(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("smpmgr", *args, timeout=RUN_TIMEOUT, env={"COLUMNS": "200"})


# --------------------------------------------------------------------------------------------
# The matrix


@dataclass(frozen=True)
class Case:
    id: str
    tool: str  # meterota | smpmgr-upload | smpmgr-upgrade
    link: str  # serial | udp
    fault: dict[str, Any] = field(default_factory=dict)  # make_shaper(**) or UDPFaultProxy(**)
    args: tuple[str, ...] = ()  # extra arguments of the faulty run
    hostile: bool = False  # meterota may fail (cleanly); otherwise it must complete


CASES = [
    # meterota over serial (binary framing after negotiation), about 1 fault per 2-5 kB, capped
    Case("drop-to-device", "meterota", "serial", dict(kind="drop", every=4000, direction="to_device", max_faults=8)),
    # replies are short: a denser schedule to hit a few
    Case("drop-to-host", "meterota", "serial", dict(kind="drop", every=500, direction="to_host", max_faults=2)),
    Case("corrupt-both", "meterota", "serial", dict(kind="corrupt", every=4000, direction="both", max_faults=8)),
    Case("dup-both", "meterota", "serial", dict(kind="dup", every=3000, span=4, direction="both", max_faults=8)),
    Case("garbage-both", "meterota", "serial", dict(kind="garbage", every=3000, direction="both", max_faults=8)),
    Case("stall-hold-to-device", "meterota", "serial",
         dict(kind="stall", at=6000, seconds=1.5, mode="hold", direction="to_device")),
    Case("stall-freeze", "meterota", "serial", dict(kind="stall", at=6000, seconds=1.5, mode="freeze", direction="both")),
    Case("stall-drop-to-host", "meterota", "serial",
         dict(kind="stall", at=1200, seconds=1.0, mode="drop", direction="to_host")),
    Case("cut-to-device", "meterota", "serial", dict(kind="cut", after=300, first=6, direction="to_device")),
    Case("cut-to-host", "meterota", "serial", dict(kind="cut", after=8, first=8, direction="to_host")),
    Case("console-corrupt", "meterota", "serial", dict(kind="corrupt", every=4000, direction="both", max_faults=8),
         args=("--console",)),
    # every upload frame after the first few is hit: the upload must give up, quickly and cleanly
    Case("hostile-drop", "meterota", "serial",
         dict(kind="drop", every=150, start=8000, direction="to_device", max_faults=5000),
         args=("--timeout", "0.5", "--retries", "2"), hostile=True),
    # smpmgr over serial (console framing, stop-and-wait, no retries)
    Case("smpmgr-corrupt", "smpmgr-upload", "serial",
         dict(kind="corrupt", every=4000, direction="to_device", max_faults=3)),
    Case("smpmgr-stall-freeze", "smpmgr-upload", "serial",
         dict(kind="stall", at=6000, seconds=1.0, mode="freeze", direction="both")),
    Case("smpmgr-upgrade-cut", "smpmgr-upgrade", "serial", dict(kind="cut", after=40, first=12, direction="to_host")),
    # UDP through the fault proxy
    Case("udp-mixed", "meterota", "udp", dict(loss=0.05, dup=0.05, reorder=0.05, max_faults=20)),
    Case("udp-loss-to-device", "meterota", "udp", dict(loss=0.1, direction="to_device", max_faults=10)),
    # once connected and the upload started, 9 in 10 datagrams vanish: give up, quickly and cleanly
    Case("hostile-udp-loss", "meterota", "udp", dict(loss=0.9, start=4), args=("--timeout", "0.5", "--retries", "2"),
         hostile=True),
    Case("udp-smpmgr-loss", "smpmgr-upload", "udp", dict(loss=0.05, max_faults=10)),
    # smpmgr is stop-and-wait: a reordered datagram is only late (hold_s); a duplicated reply is
    # taken for the answer to its next request (smpclient raises SMPBadSequence)
    Case("udp-smpmgr-reorder", "smpmgr-upgrade", "udp", dict(reorder=0.2, max_faults=10)),
    Case("udp-smpmgr-dup", "smpmgr-upload", "udp", dict(dup=0.05, max_faults=10)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_upgrade_through_faulty_link(case: Case, make_device: Callable[..., SimDevice], images: Images, db: Path,
                                     fault_runs: list[Run]) -> None:
    seed = sum(map(ord, case.id))  # fixed per case: a failure reproduces
    app_a, app_b = images.app("1.1.0"), images.app("1.2.0")
    data_a, data_b = app_a.read_bytes(), app_b.read_bytes()
    h_a, h_b = parse(data_a).hash, parse(data_b).hash

    shaper: FaultShaper | None = None
    proxy: UDPFaultProxy | None = None
    if case.link == "serial":
        kw = dict(case.fault)
        shaper = make_shaper(kw.pop("kind"), seed=seed, enabled=False, **kw)
        dev = make_device("serial", shaper=shaper)
    else:
        dev = make_device("udp")
        if not isinstance(dev, SimDevice):  # pytest --port: a real board on a serial port
            pytest.skip("needs the simulator: a UDP device behind the fault proxy")
    register(db, dev)
    factory = active(device_info(dev))
    if shaper is not None:
        shaper.enabled = True
    known: dict[bytes, bytes | None] = {factory["hash"]: None, h_a: data_a, h_b: data_b}
    run = Run(case.id, case.tool, case.link, "", case.hostile)
    fault_runs.append(run)

    try:
        if case.link == "udp":
            proxy = UDPFaultProxy(None, dev.address, seed=seed, **case.fault).start()
            assert proxy.host is not None
            target = ["--udp", proxy.host] if case.tool == "meterota" else ["--ip", proxy.host]
            run.fault = proxy.describe()
        else:
            assert shaper is not None
            target = port_of(dev) if case.tool == "meterota" else smpmgr_target(dev)
            run.fault = shaper.describe()

        # -- the faulty run ----------------------------------------------------------------
        gen = dev.ready_generation()
        t0 = time.monotonic()
        if case.tool == "meterota":
            r = meterota(db, "--json", "upgrade", *target, *case.args, str(app_a))
        elif case.tool == "smpmgr-upload":
            r = smpmgr(*target, "image", "upload", "--slot", "1", str(app_a))
        else:
            r = smpmgr(*target, "upgrade", "--slot", "1", str(app_a))
        run.seconds = time.monotonic() - t0
    finally:
        if proxy is not None:
            proxy.stop()
            run.injected = proxy.faults
            assert proxy.error is None, proxy.error
        if shaper is not None:
            shaper.enabled = False  # from here on the line is clean
            run.injected = shaper.faults

    bound = METEROTA_BOUND if case.tool == "meterota" else SMPMGR_BOUND
    assert run.seconds < bound, f"{case.tool} took {run.seconds:.1f} s under {run.fault}"

    if case.tool == "meterota":
        if r.returncode == 0:
            doc = json.loads(r.stdout)
            assert doc["result"] == "OK" and doc["to_version"] == "1.1.0+0", doc
            assert doc["confirmation"]["hash"] == h_a.hex()
            up = doc.get("upload") or {}
            run.outcome = f"OK rewinds={up.get('rewinds', 0)} timeouts={up.get('timeouts', 0)}"
        else:
            run.outcome = assert_clean_failure(r)
        # At these rates meterota's retries, rewinds and resume must carry the upgrade through.
        assert r.returncode == 0 or case.hostile, f"meterota gave up under {run.fault}: {run.outcome}"
    else:
        if r.returncode == 0:
            run.outcome = "OK"
            if case.tool == "smpmgr-upgrade":
                dev.wait_ready(after=gen)  # smpmgr reset the device into the test image
        else:
            run.outcome = f"exit {r.returncode}: {smpmgr_message(r)}"

    # -- whatever happened, nothing corrupt is valid and a success is the right image --------
    info = check_nothing_corrupt_is_valid(dev, known)
    if r.returncode == 0:
        if case.tool == "meterota":
            assert active(info)["hash"] == h_a and not info["trial"]
        elif case.tool == "smpmgr-upload":
            assert any(e["slot"] == 1 and e["hash"] == h_a for e in image_state(dev))
        else:
            assert active(info)["hash"] == h_a and info["trial"]
    if info["trial"]:
        # smpmgr's flow (or a meterota run that died after the reset) leaves the new image on trial;
        # the next meterota upgrade of that image finishes it.
        assert active(info)["hash"] == h_a, info

    # -- the fault removed: a clean meterota upgrade completes (resuming) -----------------------
    done = active(info)["hash"] == h_a and not info["trial"]
    goal, goal_hash, goal_ver = (app_b, h_b, "1.2.0+0") if done else (app_a, h_a, "1.1.0+0")
    t0 = time.monotonic()
    r2 = meterota(db, "--json", "upgrade", *port_of(dev), str(goal))
    run.after_seconds = time.monotonic() - t0
    assert r2.returncode == 0, f"clean upgrade after {case.id} failed: {r2.stderr}"
    doc2 = json.loads(r2.stdout)
    assert doc2["result"] == "OK" and doc2["to_version"] == goal_ver
    up2 = doc2.get("upload") or {}
    run.after = (f"OK {goal_ver.split('+')[0]}"
                 + (" (finished trial)" if info["trial"] else "")
                 + (" (already in slot)" if not info["trial"] and up2.get("match") and not up2.get("requests") else "")
                 + (f" resumed@{up2['resumed_from']}" if up2.get("resumed_from") else ""))
    info = check_nothing_corrupt_is_valid(dev, known)
    assert active(info)["hash"] == goal_hash and not info["trial"]


# --------------------------------------------------------------------------------------------
# The injectors themselves (no device)


def _frames(n: int = 30) -> list[bytes]:
    return [P.encode_request(P.Op.WRITE, 1, 1, i, {"off": i * 1500, "data": bytes([i]) * 1500}) for i in range(n)]


def _through(shaper: FaultShaper, stream: bytes, chunk: int = 977) -> bytes:
    return b"".join(shaper.to_device(stream[i:i + chunk]) for i in range(0, len(stream), chunk))


@pytest.mark.parametrize("framing", [P.Framing.BINARY, P.Framing.CONSOLE], ids=lambda f: f.value)
def test_serial_injectors_are_seeded_capped_switchable_and_never_forge_a_frame(framing: P.Framing) -> None:
    frames = _frames()
    stream = b"".join(P.encode(f, framing) for f in frames)
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("drop", dict(every=3000)), ("corrupt", dict(p=1 / 3000)), ("dup", dict(every_chunk=7, span=3)),
        ("garbage", dict(every=3000, fake_header=0.2)), ("cut", dict(after=50, first=4, every=9, max_faults=3)),
    ]
    for kind, kw in kinds:
        kw = dict(kw)
        cap = kw.pop("max_faults", 5)
        outs = []
        for _ in range(2):
            sh = make_shaper(kind, seed=7, max_faults=cap, **kw)
            outs.append(_through(sh, stream))
            assert 1 <= sh.faults <= cap and sh.stats()["injected"]["to_device"] == sh.faults, (kind, sh.stats())
        assert outs[0] == outs[1], f"{kind}: same seed, same bytes"
        got: list[bytes] = []
        P.StreamDecoder(got.append).feed(outs[0])
        assert set(got) <= set(frames), f"{kind}: a frame that was never sent decoded"
        assert len(got) < len(frames) and len(got) >= len(frames) - 3 * cap, (kind, len(got))
        off = make_shaper(kind, seed=7, max_faults=cap, enabled=False, **kw)
        assert _through(off, stream) == stream and off.faults == 0
        host_only = make_shaper(kind, seed=7, max_faults=cap, direction="to_host", **kw)
        assert _through(host_only, stream) == stream and host_only.faults == 0
    lose = LoseFrames(match=lambda h: h.seq in (3, 11), max_faults=2)
    got = []
    P.StreamDecoder(got.append).feed(_through(lose, stream))
    assert got == [f for f in frames if P.Header.unpack(f).seq not in (3, 11)]


def test_stall_holds_then_releases_late_or_drops() -> None:
    now = [100.0]
    hold = make_shaper("stall", at=100, seconds=2.0, mode="hold", clock=lambda: now[0])
    assert hold.to_device(b"a" * 150) == b"a" * 100  # the line stops at byte 100
    now[0] += 1.9
    assert hold.to_device(b"b" * 10) == b""
    now[0] += 0.2
    assert hold.to_device(b"c") == b"a" * 50 + b"b" * 10 + b"c" and hold.faults == 1
    assert hold.to_device(b"d" * 200) == b"d" * 200  # once
    drop = make_shaper("stall", at=0, seconds=60, mode="drop")
    assert drop.to_device(b"x" * 10) == b"" and drop.stats()["dropped"]["to_device"] == 10


def test_udp_proxy_loses_duplicates_and_reorders_with_counters() -> None:
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        echo.settimeout(0.05)
        while not stop.is_set():
            try:
                d, a = echo.recvfrom(2048)
            except socket.timeout:
                continue
            echo.sendto(d, a)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        for kw, check in (
            (dict(loss=1.0, max_faults=3), lambda got, st: got == [b"3", b"4"] and st["to_device"]["lost"] == 3),
            (dict(dup=1.0, direction="to_host", max_faults=2),
             lambda got, st: got == [b"0", b"0", b"1", b"1", b"2", b"3", b"4"] and st["to_host"]["duplicated"] == 2),
            (dict(reorder=1.0, direction="to_device", max_faults=1, hold_s=5),
             lambda got, st: got == [b"1", b"0", b"2", b"3", b"4"] and st["to_device"]["reordered"] == 1),
            (dict(loss=1.0, start=2), lambda got, st: got == [b"0", b"1"]),
        ):
            with UDPFaultProxy(None, echo.getsockname(), seed=1, **kw) as px:
                c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                c.connect((px.host, 1337))
                got = []
                for i in range(5):
                    c.send(str(i).encode())
                    c.settimeout(0.1)  # a lost datagram can only be seen as silence
                    try:
                        while True:
                            got.append(c.recv(100))
                            c.settimeout(0.03)
                    except socket.timeout:
                        pass
                c.close()
                assert check(got, px.stats()), (kw, got, px.stats())
    finally:
        stop.set()
        th.join()
        echo.close()


# --------------------------------------------------------------------------------------------
# Targeted faults: the weak spots the injector found first (each failed before 9512f6a).


def _lost_reply(group: int, cmd: int) -> LoseFrames:
    return LoseFrames(match=lambda h: h.group == group and h.cmd == cmd and h.op in (P.Op.READ_RSP, P.Op.WRITE_RSP),
                      direction="to_host")


def test_one_lost_device_info_reply_is_retried(make_device: Callable[..., SimDevice], images: Images,
                                               db: Path) -> None:
    shaper = _lost_reply(P.Group.METEROTA, 0)
    dev = make_device("serial", shaper=shaper)
    register(db, dev)
    r = meterota(db, "upgrade", *port_of(dev), str(images.app("1.1.0")))
    assert shaper.faults == 1
    assert r.returncode == 0, r.stderr


def test_fewer_retries_give_up_on_a_dead_line_sooner(make_device: Callable[..., SimDevice], images: Images,
                                                      db: Path) -> None:
    """The line to the device goes dead 8 kB into the upload: with `--retries 0` the upload gives
    up after 2 silent waits in a row past the first (retries + 2), a clean failure naming them.
    Before, an upload always waited through 6, whatever --retries said (25 s at --timeout 0.5)."""
    shaper = make_shaper("stall", at=8000, seconds=600, mode="drop", direction="to_device", enabled=False)
    dev = make_device("serial", shaper=shaper)
    register(db, dev)
    shaper.enabled = True
    r = meterota(db, "upgrade", *port_of(dev), "--timeout", "0.3", "--retries", "0", str(images.app("1.1.0")))
    shaper.enabled = False
    assert r.returncode == 3, r.stderr
    assert_clean_failure(r)
    assert "stopped answering at offset" in r.stderr and "(3 silent waits in a row)" in r.stderr, r.stderr


def test_lost_reset_reply_is_not_fatal(make_device: Callable[..., SimDevice], images: Images, db: Path) -> None:
    shaper = _lost_reply(P.Group.OS, 5)
    dev = make_device("serial", shaper=shaper)
    register(db, dev)
    app = images.app("1.1.0")
    r = meterota(db, "--json", "upgrade", *port_of(dev), str(app))
    assert shaper.faults == 1
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["result"] == "OK"
    assert active(device_info(dev))["hash"] == parse(app.read_bytes()).hash


def test_lost_reset_request_is_sent_again(make_device: Callable[..., SimDevice], images: Images, db: Path) -> None:
    shaper = LoseFrames(match=lambda h: h.group == 0 and h.cmd == 5 and h.op == P.Op.WRITE, direction="to_device")
    dev = make_device("serial", shaper=shaper)
    register(db, dev)
    app = images.app("1.1.0")
    r = meterota(db, "--json", "upgrade", *port_of(dev), str(app))
    assert shaper.faults == 1
    assert r.returncode == 0, r.stderr
    assert active(device_info(dev))["hash"] == parse(app.read_bytes()).hash


def test_an_upgrade_that_died_on_the_trial_boot_is_finished_by_the_next(
        make_device: Callable[..., SimDevice], images: Images, db: Path) -> None:
    # After the reset, every confirm request is lost: the first run gives up with the new image on
    # trial; the next run, on a clean line, finishes that trial instead of refusing the device.
    seen = {"reset": False}

    def after_reset_confirms(h: P.Header) -> bool:
        if h.group == 0 and h.cmd == 5:
            seen["reset"] = True
        return seen["reset"] and h.group == 1 and h.cmd == 0 and h.op == P.Op.WRITE

    shaper = LoseFrames(match=after_reset_confirms, direction="to_device", max_faults=None)
    dev = make_device("serial", shaper=shaper)
    register(db, dev)
    app = images.app("1.1.0")
    h = parse(app.read_bytes()).hash
    r = meterota(db, "upgrade", *port_of(dev), "--timeout", "0.5", str(app))
    assert_clean_failure(r)
    assert shaper.faults >= 1
    info = device_info(dev)
    assert info["trial"] and active(info)["hash"] == h
    shaper.enabled = False
    doc = json.loads(meterota(db, "--json", "upgrade", *port_of(dev), str(app)).stdout)
    assert doc["result"] == "OK" and doc["confirmation"]["hash"] == h.hex() and doc["from_version"] == "1.0.0+0"
    info = device_info(dev)
    assert not info["trial"] and active(info)["hash"] == h


class FakeHeaderBetweenReplies(FaultShaper):
    """Once, at the first device->host chunk after `after` bytes (the device writes whole frames,
    so a chunk starts at a frame boundary), 5 bytes of noise that look like a binary-frame header:
    `06 0B EA 60 B5`, length 60000 with a valid check byte."""

    kind = "fake-header"

    def __init__(self, after: int) -> None:
        super().__init__(direction="to_host", max_faults=1)
        self.after = after

    def _apply(self, d: str, data: bytes, pos: int) -> bytes:
        if pos >= self.after and self._take(d, pos, "fake binary header, length 60000"):
            n = 60000
            return bytes([0x06, 0x0B, n >> 8, n & 0xFF, (~((n >> 8) + (n & 0xFF))) & 0xFF]) + data
        return data


def test_noise_that_looks_like_a_frame_header_does_not_blind_the_host(
        make_device: Callable[..., SimDevice], images: Images, db: Path) -> None:
    shaper = FakeHeaderBetweenReplies(after=900)  # past the connection set-up, during the upload
    dev = make_device("serial", shaper=shaper)
    register(db, dev)
    r = meterota(db, "upgrade", *port_of(dev), "--timeout", "0.5", str(images.app("1.1.0")))
    assert shaper.faults == 1
    assert r.returncode == 0, r.stderr
