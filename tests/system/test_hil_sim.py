"""HIL mode in CI: the system suite's `--port` plumbing against a simulated board
(`--sim-board`, the board's own code under its port's stand-ins), as `make hil` runs it against a
real one. `make hil-sim` runs the whole suite on both boards at their calibrated speed; this is
the subset in `make test`, on the simulated Pico at 64 x its speed (the plumbing is under test
here, not the board's pace):

- smpmgr's one-shot upgrade, which leaves the board running an unconfirmed trial image, then
- `meterota upgrade`, whose per-test return to the factory image must start from that trial
  (it refused "the device is running an unconfirmed test image" and the suite cascaded).

The user-errors test (images for the board under test, not for unix) and the rest run in
`make hil-sim`. The last test here checks the simulated UART's FIFO overrun end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, REPO

SUBSET = [
    "tests/system/test_device_smp.py::test_smpmgr_one_shot_upgrade[serial]",
    "tests/system/test_upgrade_cli.py::test_full_upgrade_ok_with_verified_confirmation[serial]",
]


@pytest.mark.timeout(600)
def test_hil_subset_against_a_simulated_pico(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--port") or request.config.getoption("--sim-board"):
        pytest.skip("already in HIL mode")
    proc = subprocess.run([str(BIN / "pytest"), "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
                           "--sim-board", "rp2", "--sim-speed", "64", *SUBSET],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    m = re.search(r"(\d+) passed", proc.stdout)
    assert m and int(m.group(1)) == len(SUBSET), tail
    assert "skipped" not in proc.stdout.splitlines()[-1], tail


@pytest.mark.slow  # 30 s; make test keeps the throttled ESP32 on its UART (paced: no overruns)
@pytest.mark.timeout(300)
def test_uart_fifo_overruns_during_flash_stalls_and_the_upgrade_recovers(tmp_path: Path) -> None:
    """The simulated Pico on a 115200-baud UART (--link uart): while it erases or programs flash
    with interrupts off, only the 32-byte FIFO takes what the line brings, the rest is lost; the
    frames' CRC and the device's offsets make a host that keeps sending rewind, and its upload still
    ends with the right image; `meterota upgrade` keeps the line quiet while a sector is written (the
    board says its UART FIFO in info) and loses nothing."""
    from meterota import boards
    from meterota import image as img
    from meterota.lab.sim import SimDevice
    from meterota.store import Store

    from conftest import run_cli

    dev = SimDevice(tmp_path / "pico", device_id="pico-uart", board="rp2", link="uart", speed=None,
                    extra={"grace_ms": 0})
    dev.start()
    try:
        assert dev.bytes_per_second == 11520  # the line runs at its baud rate whatever the host does
        app = tmp_path / "app.bin"
        app.write_bytes(img.build_image(None, "1.1.0", slot_size=boards.slot_size("rp2"), board="rp2"))
        from meterota.client import SMPClient
        from meterota.transport import SerialTransport

        t = SerialTransport(dev.address[len("serial:"):])
        t.open()
        try:
            c = SMPClient(t)
            c.connect()
            assert c.device_info and c.device_info["uart_fifo"] == 32
            c.quiet_flash = False  # a host that keeps its window full through the erases
            st = c.upload(app.read_bytes(), compress=False)
            assert st.match is True and st.rewinds + st.timeouts > 0, st
            c.image_erase(1)
        finally:
            t.close()
        assert dev.overruns > 0, dev.log_tail()
        lost = dev.overruns
        db = tmp_path / "r.db"
        with Store(db) as st:
            st.set_key(dev.device_id, dev.key)
        r = run_cli("meterota", "--db", str(db), "--json", "upgrade", "--port", dev.address[len("serial:"):],
                    str(app), timeout=240)
        assert r.returncode == 0, r.stderr
        assert '"result": "OK"' in r.stdout
        assert dev.overruns == lost, dev.log_tail()
    finally:
        dev.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("app_py", ["while True:\n    pass\n"], ids=["hangs-at-import"])
def test_a_hung_trial_image_is_reset_by_the_picos_watchdog_and_rolls_back(tmp_path: Path, app_py: str) -> None:
    """The Pico arms its watchdog (8 s, under RP2040's 8.3 s ceiling) for a trial boot; an
    application that hangs the receiver stops the feeds, the supervisor resets the board as the
    watchdog would (reset_cause WDT_RESET), and the unconfirmed image reverts: a KO, not a brick.
    Hanging at import failed before boards/rp2 armed the watchdog ahead of the import (the HIL
    run's board hung for good after test_device_that_never_comes_back)."""
    from meterota import boards
    from meterota import image as img
    from meterota.lab.sim import SimDevice
    from meterota.store import Store

    from conftest import run_cli

    appd = tmp_path / "app"
    appd.mkdir()
    (appd / "app.py").write_text(app_py)
    app = tmp_path / "hang.bin"
    app.write_bytes(img.build_image(appd, "1.1.0", slot_size=boards.slot_size("rp2"), board="rp2"))
    dev = SimDevice(tmp_path / "pico", device_id="pico-wdt", board="rp2", speed=None, extra={"grace_ms": 0})
    dev.start()
    try:
        db = tmp_path / "r.db"
        with Store(db) as st:
            st.set_key(dev.device_id, dev.key)
        r = run_cli("meterota", "--db", str(db), "upgrade", "--port", dev.address[len("serial:"):], str(app),
                    "--reset-timeout", "60", timeout=240)
        assert r.returncode != 0, r.stdout
        assert "KO" in r.stderr + r.stdout, r.stderr
        assert dev.wdt_resets >= 1, dev.log_tail()
        assert "watchdog: no feed within 8000 ms" in dev.log_tail(200)
    finally:
        dev.stop()


@pytest.mark.timeout(300)
def test_meterota_sim_board_cli_serves_a_board_that_answers(tmp_path: Path) -> None:
    """`meterota sim --board esp32 --count 2` prints one line per board and each answers as that board."""
    import json
    import signal

    from conftest import run_cli

    db = tmp_path / "r.db"
    p = subprocess.Popen([str(BIN / "meterota"), "--db", str(db), "sim", "--board", "esp32", "--count", "2",
                          "--speed", "0", "--dir", str(tmp_path / "sim"), "--json", "--set", "grace_ms=0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        docs = [json.loads(p.stdout.readline()) for _ in range(2)]
        for doc in docs:
            r = run_cli("meterota", "--db", str(db), "--json", "info", "--port", doc["address"][len("serial:"):],
                        check=True)
            info = json.loads(r.stdout)
            assert info["id"] == doc["id"] and info["board"] == "esp32", info
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(60)
    assert p.returncode == 0, p.stderr.read() if p.stderr else ""


def _cli_upgrade(dev, tmp_path: Path, board: str, timeout: float):  # type: ignore[no-untyped-def]
    """`meterota --json upgrade` of a 1.1.0 image for `board` over the simulated board's serial port."""
    from meterota import boards
    from meterota import image as img
    from meterota.store import Store

    from conftest import run_cli

    app = tmp_path / "app.bin"
    app.write_bytes(img.build_image(None, "1.1.0", slot_size=boards.slot_size(board), board=board))
    db = tmp_path / "r.db"
    with Store(db) as st:
        st.set_key(dev.device_id, dev.key)
    return run_cli("meterota", "--db", str(db), "--json", "upgrade", "--port", dev.address[len("serial:"):],
                   str(app), timeout=timeout)


@pytest.mark.timeout(300)
def test_a_throttled_esp32_on_a_uart_upgrades_with_default_options(tmp_path: Path) -> None:
    """The simulated ESP32 at a share of its CPU speed on a 115200-baud UART (--link uart), as a
    real one behind its USB-UART bridge: `meterota upgrade` with default options ends OK. It stalled
    before: a slow board left bytes in its UART ring (rxbuf) after reading one 512-byte buffer per
    poll, the poll watched only the line, so each request was answered when the next one came, after
    the host had given up on it; the upload stopped at an offset and the board looked deaf. And the
    host kept sending while the board erased a sector with interrupts off: all but the FIFO's 128
    bytes were lost, a timeout and a rewind per sector."""
    import json

    from meterota.lab.sim import SimDevice

    dev = SimDevice(tmp_path / "esp32", device_id="esp32-uart", board="esp32", link="uart", speed=4.0,
                    extra={"grace_ms": 0})
    dev.start(timeout=120)
    try:
        # The heap the stand-ins' Python took at boot (C on the board), which the per-board heap
        # figures are given net of: about 22 KB here, never nothing.
        assert dev.standin_heap is not None and 8 * 1024 < dev.standin_heap < 64 * 1024, dev.standin_heap
        r = _cli_upgrade(dev, tmp_path, "esp32", timeout=240)
        assert r.returncode == 0, r.stderr + dev.log_tail()
        doc = json.loads(r.stdout)
        assert doc["result"] == "OK", doc
        # The host keeps the line quiet while a sector is written (the device says uart_fifo): no
        # byte lost in the FIFO, no timeout. Before, each sector's erase cost frames and a timeout.
        assert dev.overruns == 0, dev.log_tail()
        assert doc["upload"]["timeouts"] == 0, doc["upload"]
    finally:
        dev.stop()


@pytest.mark.timeout(400)
def test_a_picos_trial_boot_is_fed_while_it_reads_flash(tmp_path: Path) -> None:
    """The simulated Pico (16 x its speed) with its trial watchdog at 400 ms, as tight against
    that speed as 8 s against its own on a loaded lab machine: reading the bundle's modules and
    hashing the slots through its littlefs-file sectors takes longer than that with no feed, and
    the watchdog reverted a good image (the speed-1.0 runs on USB CDC and on the UART). The rp2
    board feeds its armed watchdog from each flash sector it loads: progress, not a hang (a hang at
    import still resets, test_a_hung_trial_image_...)."""
    import json

    from meterota.lab.sim import SimDevice

    dev = SimDevice(tmp_path / "pico", device_id="pico-feed", board="rp2", speed=16.0,
                    extra={"grace_ms": 0, "wdt_ms": 400})
    dev.start(timeout=120)
    try:
        # The chip's calls are counted as it reports them (tools/bench_boards.py's "flash reads to
        # ready"): mounting littlefs, the boot state, hashing the slot and importing the receiver
        # from its bundle read thousands of times, and program nothing but the boot state.
        assert dev.flash_reads > 1000, dev.flash_reads
        assert dev.flash_programs < dev.flash_reads // 100, (dev.flash_reads, dev.flash_programs)
        r = _cli_upgrade(dev, tmp_path, "rp2", timeout=300)
        assert dev.wdt_resets == 0, dev.log_tail(40)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["result"] == "OK"
    finally:
        dev.stop()


@pytest.mark.timeout(300)
def test_a_usb_port_vanishes_with_its_reset_and_comes_back_under_its_stable_name(tmp_path: Path) -> None:
    """USB CDC: the board's reset takes its port off the bus (the open one fails) and it comes
    back as a new pty behind STATE_DIR/tty (a second enumeration); `wait_back` reopens it and the
    board answers from its next boot. The board takes its ring and FIFO (768 bytes on rp2) ahead
    of what it reads."""
    from meterota.client import SMPClient
    from meterota.lab.sim import SimDevice
    from meterota.transport import from_address
    from meterota.upgrade import wait_back

    dev = SimDevice(tmp_path / "pico", device_id="pico-usb", board="rp2", speed=16, extra={"grace_ms": 0})
    dev.start(timeout=240)
    try:
        port = dev.address[len("serial:"):]
        assert port == str(tmp_path.resolve() / "pico" / "tty")
        first = os.readlink(port)
        t = from_address(port=dev.address)
        t.open()
        c = SMPClient(t, timeout=3.0)
        c.connect()
        assert c.device_info is not None
        boots = int(c.device_info["boots"])
        c.reset()  # its reply may go with the port: that still counts as sent
        info = wait_back(c, 240.0, boots)
        assert int(info["boots"]) == boots + 1
        assert os.path.exists(os.readlink(port)) and first.startswith("/dev/pts/")
        assert dev._link is not None and dev._link.enumerations == 2
        assert dev._link._usb is not None and dev._link._usb.rx_bytes == 512 + 256
        t.close()
    finally:
        dev.stop()


@pytest.mark.timeout(120)
def test_a_picos_boot_reads_its_bundle_directory_from_few_sectors(tmp_path: Path) -> None:
    """On stock firmware the Pico's slot sectors are littlefs files, so each time the bundle's
    littlefs moves to another 4 KiB sector the board opens another file (~25 flash reads).
    The bundle's directory entries are all created before any file's data is written, so its
    metadata pairs sit together ahead of the data: a first boot read flash 24,568 times (of
    which the receiver's import moved sectors 672 times) with each file's entry created as its
    data was written, 15,672 now (91ce611's smaller runtime: 15,604). Counted at host speed:
    a count of the chip's calls, not a time."""
    from meterota.lab.sim import SimDevice

    dev = SimDevice(tmp_path / "pico", device_id="pico-reads", board="rp2", speed=None, extra={"grace_ms": 0})
    dev.start(timeout=100)
    try:
        assert 1000 < dev.flash_reads < 19_000, dev.flash_reads
    finally:
        dev.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("board", ["rp2", "esp32"])
def test_a_boards_deflate_upload_fits_the_heap_target_net_of_the_lab(tmp_path: Path, board: str) -> None:
    """The receiver's heap target (48 KiB of 32-bit words during a deflate upload) on the
    simulated boards with their own layers (board.py, USB CDC stdin, the Pico's open sector
    file), net of what the heap held when main.py started (the lab's stand-ins' Python, C or ROM on
    a board; the root mount; the lab's boot stage). Each board's boot-time
    code (flash map, links) is imported for the boot and dropped (boardinit.py, linkcfg.py):
    kept resident it put both boards at 48.4-48.8 KiB. Host speed: the heap, not the pace."""
    from meterota import image as img
    from meterota import protocol as P
    from meterota.boards import slot_size
    from meterota.client import SMPClient
    from meterota.lab.sim import SimDevice
    from meterota.transport import from_address

    dev = SimDevice(tmp_path / board, device_id=f"{board}-heap", board=board, speed=None,
                    extra={"grace_ms": 0, "allow_downgrade": True})
    dev.start(timeout=120)
    t = from_address(port=dev.address)
    t.open()
    try:
        c = SMPClient(t, timeout=3.0)
        c.connect()
        data = img.build_image(None, "1.1.0", slot_size=slot_size(board), board=board, arch="host")
        c.image_erase(1)
        c.request(P.Op.READ, P.Group.METEROTA, 2, {"reset_peak": True})
        st = c.upload(data, compress=True)
        assert st.match is True and st.compressed, st
        peak = int(c.stats()["heap_peak"])
        # Net of what the heap held when main.py started: the stand-ins (C on a board), the root
        # mount and the lab's boot stage (a board's free heap at boot is counted after its _boot.py).
        assert dev.standin_heap is not None and dev.firmware_heap is not None
        assert 0 < dev.standin_heap < dev.firmware_heap < dev.standin_heap + 16 * 1024, (dev.standin_heap,
                                                                                         dev.firmware_heap)
        word = 8  # this host's unix port: 32-bit-equivalent KiB are bytes / 2 / 1024
        net_kib32 = (peak - dev.firmware_heap) * 4 / word / 1024
        assert net_kib32 <= 48.0, (peak, dev.firmware_heap, round(net_kib32, 2))
    finally:
        t.close()
        dev.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("board", ["rp2", "esp32"])
def test_a_board_does_an_upgrades_requests_in_the_heap_target(tmp_path: Path, board: str) -> None:
    """The target as a board would meet it: with 48 KiB of 32-bit words more than its firmware
    holds when main.py starts (the lab's stand-ins, the root mount, the boot stage: a board's free
    heap at boot is counted after them), the simulated board boots and does an upgrade's requests
    (state read, erase, deflate upload with its final checks, state read) with no restart. Before
    the boot stage registered the extensible built-ins and the modules lost their line tables
    (mpy-cross -O3), the Pico needed 61wK (49.2 KiB net) and failed here. Host speed."""
    from meterota import image as img
    from meterota.boards import slot_size
    from meterota.client import SMPClient
    from meterota.lab.sim import SimDevice
    from meterota.transport import from_address

    data = img.build_image(None, "1.1.0", slot_size=slot_size(board), board=board, arch="host")
    extra = {"grace_ms": 0, "allow_downgrade": True}
    # A first boot at the board's full heap: what the firmware holds, and slot B filled (as on
    # every board after its first upgrade, the upload below replaces an image).
    dev = SimDevice(tmp_path / board, device_id=f"{board}-target", board=board, speed=None, extra=extra)
    dev.start(timeout=120)
    try:
        t = from_address(port=dev.address)
        t.open()
        try:
            c = SMPClient(t, timeout=3.0)
            c.connect()
            c.image_erase(1)
            assert c.upload(data, compress=False).match is True
        finally:
            t.close()
        firmware = dev.firmware_heap
    finally:
        dev.stop()
    assert firmware is not None and firmware > 0
    # -X heapsize=<n>w: n bytes of 32-bit words (this 64-bit host gets 2n)
    heap = f"{48 * 1024 + firmware // 2}w"
    dev = SimDevice(tmp_path / board, device_id=f"{board}-target", board=board, speed=None, extra=extra, heap=heap)
    dev.start(timeout=120)
    try:
        t = from_address(port=dev.address)
        t.open()
        try:
            c = SMPClient(t, timeout=3.0, retries=1)
            c.connect()
            c.image_state()
            c.image_erase(1)
            st = c.upload(data, compress=True, max_stalls=2)
            assert st.match is True and st.compressed, st
            assert {e["slot"] for e in c.image_state()} == {0, 1}
        finally:
            t.close()
        assert dev.restarts == 0, dev.log_tail()
    finally:
        dev.stop()
