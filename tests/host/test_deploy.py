"""meterota.deploy: the pure parts, and its copy step end to end through
mpremote against the unix MicroPython over a two-pty bridge (reference §4.6)."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path
from typing import Iterator

import pytest

from meterota import deploy as dp
from meterota.errors import EXIT_UNREACHABLE, EXIT_USAGE, MeterotaError

REPO = Path(__file__).resolve().parents[2]
CFG = {"id": "meter-1", "key": "11" * 32, "serial": "stdin", "buf_size": 2048, "buf_count": 4}


def test_unknown_board_is_refused() -> None:
    with pytest.raises(dp.DeployError) as ei:
        dp.deploy("/dev/null", "stm32", CFG, image=None)
    assert ei.value.exit_code == EXIT_USAGE
    assert "unknown board 'stm32'" in str(ei.value) and "\n" not in str(ei.value)
    assert isinstance(ei.value, MeterotaError)


@pytest.mark.parametrize("board", ["esp32", "rp2"])
def test_files_sent(board: str) -> None:
    src = dp.source_files(board)
    device = {p.name for p in (REPO / "device").glob("*.py")}
    assert device <= set(src) and "mtboot.py" in src and "board.py" in src and "main.py" in src
    assert src["board.py"] == REPO / "boards" / board / "board.py"
    files = dp.build_files(board, dp.validate_config(board, CFG))
    assert "main.py" in files and files["main.py"] == (REPO / "boards" / board / "main.py").read_bytes()
    assert "config.json" in files
    for name in src:
        if name != "main.py":
            assert name[:-3] + ".mpy" in files and name not in files
    assert all(files[n][:1] == b"M" for n in files if n.endswith(".mpy"))  # mpy header 'M'
    assert set(files) == {n if n == "main.py" else n[:-3] + ".mpy" for n in src} | {"config.json"}
    if board == "esp32":
        assert "firmware_ab.mpy" in files


@pytest.mark.parametrize("bad, why", [
    ({"key": "11" * 32}, "'id'"),
    ({"id": "x", "key": "zz"}, "hex"),
    ({"id": "x", "key": "11" * 4}, "16 bytes"),
    ({"id": "x", "buf_size": 100}, "buf_size"),
    ({"id": "x", "buf_count": True}, "buf_count"),
    ({"id": "x", "serial": "usb0"}, "serial"),
    ({"id": "x", "serial": "uart:1:17"}, "serial"),
    ({"id": "x", "wifi": {"key": "k"}}, "wifi"),
    ({"id": "x", "serial": "", "wifi": None}, "no link"),
    ({"id": "x", "variant": "pico3"}, "variant"),
])
def test_config_validation(bad: dict, why: str) -> None:
    with pytest.raises(dp.DeployError) as ei:
        dp.validate_config("rp2", bad)
    assert why in str(ei.value) and ei.value.exit_code == EXIT_USAGE


def test_config_validation_accepts() -> None:
    cfg = dp.validate_config("rp2", dict(CFG, serial="uart:0:0:1:921600", wifi={"ssid": "m", "key": "k"},
                                         udp_port=1337), variant="pico_w")
    assert cfg["variant"] == "pico_w"
    with pytest.raises(dp.DeployError, match="no radio"):
        dp.validate_config("rp2", dict(CFG, wifi={"ssid": "m"}), variant="pico")
    assert dp.validate_config("esp32", CFG, variant="stock")["variant"] == "stock"


def test_error_lines(tmp_path: Path) -> None:
    from mpremote.transport import TransportError, TransportExecError

    e = dp.explain(TransportError("failed to access /dev/ttyNOPE9"), "/dev/ttyNOPE9")
    assert "no such port" in str(e) and e.exit_code == EXIT_UNREACHABLE
    locked = tmp_path / "tty"
    locked.write_text("")
    locked.chmod(0)
    if os.geteuid() != 0:  # root may open anything
        e = dp.explain(TransportError(f"failed to access {locked}"), str(locked))
        assert "permission denied" in str(e) and "dialout" in str(e)
    free = tmp_path / "tty2"
    free.write_text("")
    e = dp.explain(TransportError(f"failed to access {free}"), str(free))
    assert "busy" in str(e)
    e = dp.explain(TransportError("could not enter raw repl"), "/dev/ttyUSB0")
    assert "wiring" in str(e) and "grace_ms" in str(e) and e.exit_code == EXIT_UNREACHABLE
    e = dp.explain(TransportExecError(1, "Traceback (most recent call last):\n  File \"<stdin>\"\n"
                                         "OSError: [Errno 28] ENOSPC\n"), "p")
    assert str(e).startswith("board filesystem full") and "\n" not in str(e)
    for err in (TransportError("failed to access x"), TransportError("could not enter raw repl")):
        assert "\n" not in str(dp.explain(err, "x"))


def test_deploy_unreachable_port_is_one_line() -> None:
    with pytest.raises(dp.DeployError) as ei:
        dp.deploy("/dev/ttyNOPE9", "rp2", CFG, image=None, progress=lambda s: None)
    assert ei.value.exit_code == EXIT_UNREACHABLE and "no such port" in str(ei.value)


# -- end to end: mpremote <-> pty B <-bridge-> pty A <-> unix micropython --------
MICROPYTHON = shutil.which("micropython", path=str(Path(sys.executable).parent)) or shutil.which("micropython")


@pytest.fixture
def unix_repl(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if MICROPYTHON is None:
        pytest.skip("no unix micropython")
    devfs = tmp_path / "devfs"
    devfs.mkdir()
    ma, sa = pty.openpty()
    mb, sb = pty.openpty()
    tty.setraw(sa)  # no ONLCR: mpremote must see "raw REPL; CTRL-B to exit\r\n" as sent
    tty.setraw(sb)
    proc = subprocess.Popen([MICROPYTHON], stdin=sa, stdout=sa, stderr=sa, cwd=devfs,
                            start_new_session=True, close_fds=True)
    os.close(sa)
    stop = threading.Event()

    def bridge() -> None:
        while not stop.is_set():
            r, _, _ = select.select([ma, mb], [], [], 0.05)
            for fd in r:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    return
                os.write(mb if fd == ma else ma, data)

    th = threading.Thread(target=bridge, daemon=True)
    th.start()
    try:
        yield os.ttyname(sb), devfs
    finally:
        stop.set()
        th.join(1)
        proc.kill()
        proc.wait(5)
        for fd in (ma, mb, sb):
            os.close(fd)


def test_copy_step_through_mpremote(unix_repl: tuple[str, Path]) -> None:
    port, devfs = unix_repl
    files = dp.build_files("rp2", dp.validate_config("rp2", CFG))
    t0 = time.monotonic()
    t = dp.connect(port, soft_reset=False)  # `resume`: a soft reset would end the unix interpreter
    try:
        log: list[str] = []
        dp.copy_files(t, files, log.append)
        assert len(log) == len(files)
        # The copied files are importable by the interpreter that received them.
        out = t.exec("import json\nprint(json.load(open('config.json'))['id'])")
        assert out.strip() == b"meter-1"
        out = t.exec("import cbor\nprint(cbor.__file__)")
        assert out.strip().endswith(b"cbor.mpy")
        # crc16n.mpy holds the viper CRC compiled for the Pico's Cortex-M0+: not this CPU's.
        out = t.exec("try:\n import crc16n\nexcept ValueError as e:\n print(e)")
        assert out.strip() == b"incompatible .mpy arch"
        out = t.exec("import framing\nprint(framing._crc16_fast, hex(framing.crc16(b'123456789')))")
        assert out.split() == [b"None", b"0x31c3"]  # framing itself runs, on its Python loop
    finally:
        t.close()
    for name, data in files.items():
        assert (devfs / name).read_bytes() == data, name
    assert time.monotonic() - t0 < 20


def test_slot_write_step_through_mpremote(unix_repl: tuple[str, Path]) -> None:
    """write_slot_a's snippet against a board whose slot A and meta are the
    rp2 board's FileSectors (NOR rules in files), on the unix interpreter."""
    port, devfs = unix_repl
    shutil.copy(REPO / "boards" / "rp2" / "board.py", devfs / "rp2board.py")
    (devfs / "board.py").write_text(
        "from rp2board import FileSectors\n"
        "class Board:\n"
        "    def __init__(self):\n"
        "        self.slot_a = FileSectors('mtra', 8)\n"
        "        self.meta = FileSectors('mtrm', 4)\n")
    (devfs / "mtrm").mkdir()
    (devfs / "mtrm" / "002").write_bytes(b"\0" * 4096)  # an old upload session
    image = bytes((i * 31 + 7) & 0xFF for i in range(3 * 4096 + 1000))
    t = dp.connect(port, soft_reset=False)
    try:
        dp.write_slot_a(t, image, lambda s: None)
        with pytest.raises(dp.DeployError, match="does not fit"):
            dp.write_slot_a(t, bytes(9 * 4096), lambda s: None)
    finally:
        t.close()
    got = b"".join((devfs / "mtra" / f"{n:03d}").read_bytes() for n in range(4))
    assert got[:len(image)] == image and got[len(image):] == b"\xff" * (len(got) - len(image))
    assert not (devfs / "mtra" / "004").exists()
    assert not any((devfs / "mtrm").iterdir()), "meta erased"
