"""Simulator supervisor tests: real MicroPython processes, real ptys and sockets, no mocks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import serial

from meterota.lab.sim import DEFAULT_MAIN, LinkShaper, SimCluster, SimDevice, SimError, _is_ready_line

FIXTURE = Path(__file__).parent / "sim_fixtures" / "echo_main.py"
PY = Path(sys.executable)
SMPMGR = PY.parent / "smpmgr"


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def make_dev(tmp_path: Path) -> Iterator[Callable[..., SimDevice]]:
    made: list[SimDevice] = []

    def make(name: str = "d1", **kw: Any) -> SimDevice:
        kw.setdefault("device_id", f"meter-{name}")
        d = SimDevice(tmp_path / name, main_script=FIXTURE, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


def _open(dev: SimDevice) -> serial.Serial:
    kind, path = dev.address.split(":", 1)
    assert kind == "serial"
    return serial.Serial(path, 115200, timeout=5)


def _roundtrip(port: serial.Serial, data: bytes) -> bytes:
    port.write(data)
    return bytes(port.read(len(data)))


def test_serial_echo_config_and_tty_link(make_dev: Callable[..., SimDevice]) -> None:
    provisioned: list[Path] = []

    def provision(d: Path) -> None:
        provisioned.append(d)
        (d / "flash.bin").write_bytes(b"\xff" * 4096)

    dev = make_dev(extra={"self_confirm": True, "buf_size": 512}, provision=provision)
    dev.start()
    assert dev.state == "running"
    assert provisioned == [dev.state_dir]
    cfg = json.loads((dev.state_dir / "config.json").read_text())
    assert cfg["id"] == "meter-d1" and cfg["board"] == "unix" and cfg["role"] == "meter"
    assert bytes.fromhex(cfg["key"]) == dev.key and len(dev.key) == 32
    assert cfg["serial"].startswith("tcp:127.0.0.1:") and cfg["udp"] is None
    assert cfg["self_confirm"] is True and cfg["buf_size"] == 512
    assert os.readlink(dev.state_dir / "tty") == dev.address.split(":", 1)[1]
    with _open(dev) as port:
        # Raw pty: every byte value, including ^C/^D/XON/XOFF and CR/LF, passes unchanged.
        payload = bytes(range(256)) * 4
        assert _roundtrip(port, payload) == payload


def test_reset_keeps_pty_and_client_talks_again(make_dev: Callable[..., SimDevice]) -> None:
    dev = make_dev()
    dev.start()
    address = dev.address
    with _open(dev) as port:
        assert _roundtrip(port, b"hello\n") == b"hello\n"
        g = dev.ready_generation()
        assert _roundtrip(port, b"RESET\n") == b"RESET\n"
        dev.wait_ready(10, after=g)
        assert dev.address == address
        assert _roundtrip(port, b"again\n") == b"again\n"
    assert dev.exit_codes == [3] and dev.restarts == 1 and dev.state == "running"
    assert "--- start 2 (reset) ---" in dev.log_tail()


def test_bytes_sent_during_restart_are_dropped(make_dev: Callable[..., SimDevice]) -> None:
    # The boot delay keeps the restarted device disconnected long enough to send into the gap.
    dev = make_dev(extra={"boot_delay_ms": 300})
    dev.start()
    with _open(dev) as port:
        g = dev.ready_generation()
        assert _roundtrip(port, b"RESET\n") == b"RESET\n"
        dev.wait_for(lambda d: len(d.exit_codes) == 1, 10)
        port.write(b"LOST\n")
        dev.wait_for(lambda d: d.dropped_to_device >= 5, 10)
        assert dev.ready_generation() == g  # dropped in the gap, not after the device came back
        dev.wait_ready(10, after=g)
        port.write(b"PING\n")
        # Had LOST been queued instead of dropped it would come back first.
        assert port.read_until(b"PING\n") == b"PING\n"


def test_powerfail_env_is_passed_once_and_86_restarts(make_dev: Callable[..., SimDevice]) -> None:
    dev = make_dev()
    dev.start(powerfail="3:torn:7")
    with _open(dev) as port:
        g = dev.ready_generation()
        assert _roundtrip(port, b"PF\n") == b"PF\n"
        dev.wait_ready(10, after=g)
        assert _roundtrip(port, b"ok\n") == b"ok\n"
    log = dev.log_tail()
    assert "--- start 1 (start, MTR_POWERFAIL=3:torn:7) ---" in log
    assert "powerfail=3:torn:7" in log
    assert log.count("powerfail=None") == 1  # the restart ran without injection
    assert dev.exit_codes == [86]
    with pytest.raises(ValueError):
        make_dev("d2").start(powerfail="3:sideways:7")


def test_crash_and_kill_are_restarted(make_dev: Callable[..., SimDevice]) -> None:
    dev = make_dev()
    dev.start()
    with _open(dev) as port:
        g = dev.ready_generation()
        assert _roundtrip(port, b"CRASH\n") == b"CRASH\n"
        dev.wait_ready(10, after=g)
        g = dev.ready_generation()
        dev.kill()
        dev.wait_ready(10, after=g)
        assert _roundtrip(port, b"alive\n") == b"alive\n"
    assert dev.exit_codes == [1, -signal.SIGKILL]
    assert dev.restarts == 2 and dev.state == "running"
    assert "RuntimeError: CRASH requested" in dev.log_tail()


def test_clean_exit_is_not_restarted(make_dev: Callable[..., SimDevice]) -> None:
    dev = make_dev()
    dev.start()
    with _open(dev) as port:
        port.write(b"STOP\n")
        dev.wait_for(lambda d: d.state == "stopped", 10)
    assert dev.exit_codes == [0] and dev.restarts == 0 and dev.pid is None


def test_crash_loop_ends_dead(make_dev: Callable[..., SimDevice]) -> None:
    dev = make_dev(extra={"crash_on_boot": True})
    with pytest.raises(SimError, match="crash_on_boot"):
        dev.start(timeout=15)
    assert dev.state == "dead"
    assert dev.exit_codes == [1] * 5 and dev.restarts == 4
    assert dev.dead_reason and "5 consecutive crashes" in dev.dead_reason
    assert _children(os.getpid()) == []


def test_udp_echo_two_devices(tmp_path: Path) -> None:
    # Occupy the first candidate address (if free) to check that busy addresses are skipped.
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        blocker.bind(("127.0.0.2", 1337))
    except OSError:
        pass  # someone else holds it, which is just as good
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    try:
        with SimCluster(tmp_path, 2, transport="udp", main_script=FIXTURE) as cluster:
            addrs = [d.address for d in cluster]
            assert len(set(addrs)) == 2 and "udp:127.0.0.2:1337" not in addrs
            for d in cluster:
                _, host, port = d.address.split(":")
                cfg = json.loads((d.state_dir / "config.json").read_text())
                assert cfg["udp"] == f"{host}:{port}" and cfg["serial"] is None
                client.sendto(d.device_id.encode(), (host, int(port)))
                data, src = client.recvfrom(2048)
                assert data == d.device_id.encode() and src == (host, 1337)
            d0 = cluster[0]
            _, host, port = d0.address.split(":")
            g = d0.ready_generation()
            client.sendto(b"RESET\n", (host, int(port)))
            assert client.recvfrom(2048)[0] == b"RESET\n"
            d0.wait_ready(10, after=g)
            client.sendto(b"back", (host, int(port)))
            assert client.recvfrom(2048)[0] == b"back"
    finally:
        client.close()
        blocker.close()


def test_pacing_rate_limits_the_serial_link(make_dev: Callable[..., SimDevice]) -> None:
    dev = make_dev(bytes_per_second=11520)  # a 115200-baud UART
    dev.start()
    payload = os.urandom(20_000)
    with _open(dev) as port:
        t0 = time.monotonic()
        port.write(payload)
        echoed = port.read(len(payload))
        elapsed = time.monotonic() - t0
    assert echoed == payload
    assert elapsed >= 1.6, elapsed  # 20000 / 11520 = 1.74 s of line time


class _Upper(LinkShaper):
    def to_host(self, data: bytes) -> bytes:
        return data.upper()


def test_shaper_hook_is_applied(make_dev: Callable[..., SimDevice]) -> None:
    dev = make_dev(shaper=_Upper())
    dev.start()
    with _open(dev) as port:
        assert _roundtrip(port, b"shape me\n") == b"SHAPE ME\n"


def test_stop_leaves_nothing_behind(tmp_path: Path) -> None:
    threads_before = threading.active_count()
    cluster = SimCluster(tmp_path, 2, main_script=FIXTURE)
    cluster.start()
    pids = [p for p in (d.pid for d in cluster) if p is not None]
    assert len(pids) == 2 and sorted(_children(os.getpid())) == sorted(pids)
    masters = [d._link.master for d in cluster if d._link is not None]
    cluster.stop()
    assert all(d.state == "stopped" for d in cluster)
    assert all(_gone(p) for p in pids)
    assert _children(os.getpid()) == []
    assert threading.active_count() == threads_before
    for fd in masters:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert not any((d.state_dir / "tty").is_symlink() for d in cluster)
    # A stopped device can be started again with the same state (and key).
    d = cluster[0]
    key = d.key
    d.start()
    try:
        assert d.key == key and d.state == "running"
    finally:
        d.stop()


def test_cli_json_serves_until_sigterm(tmp_path: Path) -> None:
    base = tmp_path / "sim"
    proc = subprocess.Popen(
        [str(PY), "-m", "meterota.lab.sim", "--count", "2", "--transport", "udp", "--json",
         "--dir", str(base), "--main", str(FIXTURE), "--set", "self_confirm=true"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        rows = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert [r["id"] for r in rows] == ["meter-0001", "meter-0002"]
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(5)
        with client:
            for r in rows:
                assert r["state_dir"] == str(base / f"dev-{r['id'][-4:]}")
                cfg = json.loads((Path(r["state_dir"]) / "config.json").read_text())
                assert cfg["key"] == r["key"] and cfg["self_confirm"] is True
                _, host, port = r["address"].split(":")
                client.sendto(b"hi", (host, int(port)))
                assert client.recvfrom(64)[0] == b"hi"
        device_pids = _children(proc.pid)
        assert len(device_pids) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert all(_gone(p) for p in device_pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("line", "ready"),
    [
        (b"meterota: ready\n", True),
        (b"meterota: ready meter-0001 \n", True),  # what boards/unix/board.py prints
        (b"meterota: ready meter-0001 recovery\r\n", True),
        (b"meterota: readyish\n", False),
        (b"meterota: reset\n", False),
    ],
)
def test_ready_line(line: bytes, ready: bool) -> None:
    assert _is_ready_line(line) is ready


@pytest.mark.skipif(not DEFAULT_MAIN.exists(), reason="device program not written yet")
def test_real_device_answers_smpmgr_over_the_pty(tmp_path: Path) -> None:
    # Integration check of the contract with the lead's device (unprovisioned: recovery mode).
    dev = SimDevice(tmp_path / "real", device_id="meter-real")
    try:
        dev.start()
        r = subprocess.run(
            [str(SMPMGR), "--port", dev.address.split(":", 1)[1], "--timeout", "5", "os", "echo", "hi"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr + dev.log_tail()
        assert "r='hi'" in r.stdout
    finally:
        dev.stop()


def test_a_boards_watchdog_clock_leaves_out_its_wait_for_a_host_cpu() -> None:
    """Two busy processes on one CPU each wait on its run queue about half the time: the board
    clock of one (what the lab's watchdog counts) falls behind wall time by that wait, which a
    chip never has; after the process exits the clock keeps the last wait and does not jump."""
    from meterota.lab.sim import BoardClock

    if not os.path.exists(f"/proc/{os.getpid()}/schedstat") or not hasattr(os, "sched_setaffinity"):
        pytest.fail("this Linux host has no /proc/PID/schedstat: the lab's watchdog would count wall time")
    cpu = min(os.sched_getaffinity(0))
    spin = [sys.executable, "-c", "while True: pass"]
    procs = [subprocess.Popen(spin, preexec_fn=lambda: os.sched_setaffinity(0, {cpu})) for _ in range(2)]
    try:
        clock = BoardClock(procs[0].pid)
        w0, c0 = time.monotonic(), clock.now()
        deadline = w0 + 30
        while clock.waited() < 0.3:
            assert time.monotonic() < deadline, "no run-queue wait measured"
            time.sleep(0.05)  # polling the kernel's counter, not synchronisation
        behind = (time.monotonic() - w0) - (clock.now() - c0)
        assert behind >= 0.25, behind
    finally:
        for p in procs:
            p.kill()
            p.wait()
    last = time.monotonic() - clock.now()
    assert abs((time.monotonic() - clock.now()) - last) < 0.05
    assert clock.waited() >= 0.3
