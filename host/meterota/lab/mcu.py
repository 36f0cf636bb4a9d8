"""Simulated MCU boards for the lab: Raspberry Pi Pico (rp2) and ESP32 running their own board code.

A simulated board runs ``boards/<board>/main.py`` and the device modules from a device
filesystem (littlefs over the board's flash, as ``meterota deploy`` leaves it), under the unix
MicroPython with the stand-ins of ``lab/ports`` first on MICROPYPATH (rp2.Flash, esp32.Partition,
machine.WDT/UART/reset...), the board's heap (``-X heapsize``) and the board's CPU speed (the
supervisor's :class:`Throttle`). This module holds the board facts and builds the flash a factory
programmer (or ``meterota deploy``) would leave.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
PORTS_DIR = Path(__file__).resolve().parent / "ports"
LAB_BOOT = PORTS_DIR / "labboot.py"
SECTOR = 4096
KiB = 1024

# Calibration: pystone_lowmem (micropython-lib, not shipped) and our kernel (lab/ports/_speed.py)
# timed side by side in CPU seconds on the unix MicroPython of the development machine
# (2026-12-02, 5 pairs: 3.16, 3.30, 2.17, 2.66, 3.07 pystones per kernel pass; median 3.07).
# Published board figures are pystones; the lab measures the kernel on whatever host runs it.
PYSTONES_PER_PASS = 3.07


@dataclass(frozen=True)
class Profile:
    """What the lab knows about one board."""

    name: str  # board name as boards/<name>
    chip: str
    cpu_hz: int
    heap: str  # -X heapsize (the "w" form: 32-bit words equivalent on a 64-bit host)
    pystones: float  # published MicroPython pystone_lowmem figure at cpu_hz
    pystone_source: str
    erase_us: int  # one 4 KiB sector erase
    page_us: int  # one 256-byte page program
    flash_source: str
    wdt_max_ms: int  # 0: no upper limit enforced by the port
    uart_fifo: int
    reset_ms: int  # reset to the firmware's first line (boot ROM, bootloader, port init)
    # USB CDC receive path: MICROPY_HW_STDIN_BUFFER_LEN (the stdin ring) + TinyUSB's CDC RX FIFO
    # (CFG_TUD_CDC_RX_BUFSIZE, 256 at full speed); beyond that the host is NAKed.
    stdin_ring: int = 512
    cdc_rx_fifo: int = 256


PROFILES: dict[str, Profile] = {
    "rp2": Profile(
        name="rp2", chip="rp2040", cpu_hz=125_000_000,
        # micropython#12557: gc.mem_free() = 209936 at boot on a Pico (v1.20).
        heap="208wK",
        # scruss.com "Parallel MicroPython Benchmarking" (same code on every board): Pico W
        # RP2040 @125 MHz 19.8 s vs HUZZAH32 ESP32 @160 MHz 15.4 s, i.e. 0.52 x an ESP32 @240 MHz
        # (clock-scaled); times the ESP32's 1075 pystones/s below.
        pystones=559.0,
        pystone_source="RP2040 @125 MHz = 0.52 x ESP32 @240 MHz (scruss.com board benchmark, "
                       "MicroPython 1.24) x 1075 pystones/s",
        erase_us=45_000, page_us=400,
        flash_source="W25Q16JV (Pico): 4 KiB sector erase ~45 ms typ, page program ~0.4 ms typ",
        wdt_max_ms=8388, uart_fifo=32, reset_ms=250,
    ),
    "esp32": Profile(
        name="esp32", chip="esp32", cpu_hz=240_000_000,
        # ESP32 without PSRAM: 56 KiB initial heap growing with split-heap (v1.21+) into the IDF
        # heap that Wi-Fi/lwIP leave (micropython#12141, #7214): ~128 KiB is what a meter NIC gets.
        heap="128wK",
        pystones=1075.0,
        pystone_source="ESP32 @240 MHz pystone_lowmem: 1075 pystones/s (v923z/micropython-ulab#296, "
                       "2021; micropython#6565 reports 1014-1602 across versions)",
        erase_us=45_000, page_us=600,
        flash_source="ESP32-WROOM GD25Q32/W25Q32-class: 4 KiB sector erase ~45 ms typ, page program "
                     "~0.6 ms typ; ESP-IDF measures ~39 ms per sector erased inline (espressif/esp-idf#14318)",
        wdt_max_ms=0, uart_fifo=128, reset_ms=400,
        stdin_ring=260,  # ports/esp32 (native USB: S2/S3/C3/C6)
    ),
}
BOARDS = tuple(PROFILES)


def profile(board: str) -> Profile:
    try:
        return PROFILES[board]
    except KeyError:
        raise ValueError(f"unknown simulated board {board!r} (known: {', '.join(PROFILES)})") from None


# -- flash maps ---------------------------------------------------------------------------------

def _layout(board: str) -> dict[str, Any]:
    return dict(json.loads((REPO / "boards" / board / "layout.json").read_text()))


def esp32_partitions() -> list[list[Any]]:
    """The meterota partition table (boards/esp32/partitions-meterota-4MiB.csv) as
    [label, type, subtype, offset, size] rows, the way esp32.Partition sees it."""
    types = {"app": 0, "data": 1}
    subtypes = {"factory": 0x00, "ota": 0x00, "phy": 0x01, "nvs": 0x02, "undefined": 0x06, "fat": 0x81,
                "spiffs": 0x82, "littlefs": 0x83, **{f"ota_{i}": 0x10 + i for i in range(16)}}
    rows = []
    for line in (REPO / "boards" / "esp32" / "partitions-meterota-4MiB.csv").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        f = [x.strip() for x in line.split(",")]
        rows.append([f[0], types[f[1]], subtypes[f[2]], int(f[3], 0), int(f[4], 0)])
    return rows


# -- the device filesystem --------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def device_files(board: str) -> tuple[tuple[str, bytes], ...]:
    """What `meterota deploy` copies to the board: device/*.py and boards/<board>/*.py compiled
    to .mpy (bytecode, loaded into RAM as on stock firmware; main.py stays source)."""
    from .. import deploy
    from ..image import _compile_mpy

    out: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, src in deploy.source_files(board).items():
            if name in deploy.KEEP_PY:
                out.append((name, src.read_bytes()))
                continue
            dest = Path(tmp) / (name[:-3] + ".mpy")
            _compile_mpy(src, dest, "host")  # the simulated board runs on this CPU
            out.append((dest.name, dest.read_bytes()))
    return tuple(out)


def _littlefs(block_count: int, prog_size: int, files: dict[str, bytes]) -> bytes:
    from littlefs import LittleFS

    fs = LittleFS(block_size=SECTOR, block_count=block_count, prog_size=prog_size, read_size=32,
                  lookahead_size=32, disk_version=0x00020000)
    for name, data in files.items():
        parent = name.rpartition("/")[0]
        if parent:
            try:
                fs.makedirs(parent, exist_ok=True)
            except FileExistsError:
                pass
        with fs.open(name, "wb") as f:
            f.write(data)
    return bytes(fs.context.buffer)


def factory_image(board: str) -> bytes:
    from .. import boards

    return _factory(board, boards.FACTORY_VERSION, boards.slot_size(board))


@functools.lru_cache(maxsize=4)
def _factory(board: str, version: str, slot: int) -> bytes:
    from .. import image

    # Native code for this CPU, which runs the simulated board; an image built for the real
    # board (armv6m, xtensawin) runs here too, its CRC on the Python loop (device/framing.py).
    return image.build_image(None, version, slot_size=slot, board=board, arch="host")


def provision(board: str, state_dir: Path, config: dict[str, Any], img: bytes | None = None) -> None:
    """Write the flash of a new simulated board: erased, then the device filesystem with the
    device code and config.json, and the factory image in slot A (as `meterota deploy` leaves it)."""
    img = factory_image(board) if img is None else img
    files = dict(device_files(board))
    files["config.json"] = json.dumps(config, indent=1, sort_keys=True).encode()
    if board == "rp2":
        lay = _layout("rp2")["boards"][config.get("variant", "pico")]
        size = int(lay["fs_size"])
        # Stock firmware: littlefs over the whole region (_boot.py: VfsLfs2(rp2.Flash(),
        # progsize=256)); the board's "files" mode keeps meta/slots as one file per sector.
        a_sectors = -(-len(img) // SECTOR)
        if a_sectors * SECTOR > int(lay["slot_a"][1]):
            raise ValueError("factory image larger than slot A")
        for n in range(a_sectors):  # boards/rp2/board.py FileSectors: 8 files to a subdirectory
            files[f"mtra/{n // 8}/{n:03d}"] = img[n * SECTOR:(n + 1) * SECTOR].ljust(SECTOR, b"\xff")
        flash = _littlefs(size // SECTOR, 256, files)
    elif board == "esp32":
        parts = {p[0]: p for p in esp32_partitions()}
        size = 4 * 1024 * KiB
        flash_b = bytearray(b"\xff" * size)
        _, _, _, a_off, a_size = parts["mtr_a"]
        if len(img) > a_size:
            raise ValueError("factory image larger than slot A")
        flash_b[a_off:a_off + len(img)] = img
        _, _, _, v_off, v_size = parts["vfs"]
        # _boot.py / inisetup.py: littlefs2 with the default sizes over the vfs partition.
        flash_b[v_off:v_off + v_size] = _littlefs(v_size // SECTOR, 32, files)
        flash = bytes(flash_b)
    else:
        raise ValueError(f"unknown simulated board {board!r}")
    tmp = state_dir / "flash.bin.tmp"
    tmp.write_bytes(flash)
    tmp.replace(state_dir / "flash.bin")
    (state_dir / "otadata.json").unlink(missing_ok=True)


def hw_params(board: str, state_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """hw.json: what the stand-ins read (lab/ports/_hw.py)."""
    p = profile(board)
    hw: dict[str, Any] = {
        "board": board, "chip": p.chip, "cpu_hz": p.cpu_hz, "flash": str(state_dir / "flash.bin"),
        "erase_us": p.erase_us, "page_us": p.page_us, "wdt_max_ms": p.wdt_max_ms, "uart_fifo": p.uart_fifo,
        "unique_id": os.urandom(8).hex() if not (state_dir / "hw.json").exists() else
        json.loads((state_dir / "hw.json").read_text()).get("unique_id", "e660000000000000"),
    }
    if board == "rp2":
        lay = _layout("rp2")["boards"][config.get("variant", "pico")]
        hw["flash_size"] = int(lay["fs_size"])
    else:
        hw["flash_size"] = 4 * 1024 * KiB
        hw["partitions"] = esp32_partitions()
        hw["otadata"] = str(state_dir / "otadata.json")
    return hw


# -- speed --------------------------------------------------------------------------------------

def _proc_cpu_clock(pid: int) -> int:
    # The Linux per-process CPU-time clock (CPUCLOCK_SCHED of `pid`), as clock_getcpuclockid gives.
    return ((~pid) << 3) | 2


class Throttle:
    """Keep a device process at `duty` of one host CPU: SIGCONT while it has credit, SIGSTOP when
    its CPU time has used it up. Credit accrues at `duty` per second of wall time, at most one
    burst's worth while the device idles (an idle MCU banks no cycles).

    What is charged: the process's user CPU time (the kernel's precise per-process clock, scaled
    by its user share), from `begin()` on. So other load on the host does not count as device
    work, the interpreter's own start-up (the board's ROM and bootloader time is modelled apart)
    and the system time of the file-backed flash model (hardware, not CPU work) are free. The
    flash stand-ins' own bytecode (C on the boards) is refunded as the chip reports its calls
    (`refund`): it is taken off what the device is charged, before or after the charge."""

    BURST_S = 0.0005  # host CPU per burst; the device runs in bursts of this, stopped in between

    def __init__(self, pid: int, duty: float) -> None:
        if not 0 < duty <= 1:
            raise ValueError("duty must be in (0, 1]")
        self.pid = pid
        self.duty = duty
        self._clock = _proc_cpu_clock(pid)
        self._stop = threading.Event()
        self._begin = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"throttle-{pid}", daemon=True)
        self.stopped_s = 0.0
        self.charged_s = 0.0
        self.refunded_s = 0.0
        self._refund_lock = threading.Lock()
        self._refund = 0.0  # host CPU seconds owed back, not yet taken
        self._thread.start()

    def refund(self, seconds: float) -> None:
        """Host CPU the device spent on work the board does in hardware or C (the flash
        stand-ins): not the board's time. Ignored before `begin()`, when nothing is charged."""
        if seconds > 0 and self._begin.is_set():
            with self._refund_lock:
                self._refund += seconds

    @staticmethod
    def settle(credit: float, prepaid: float, used: float, refund: float, cap: float) -> tuple[float, float]:
        """(credit, prepaid) after charging `used` and taking `refund`. A refund pays for charged
        CPU; what would lift the credit past the burst cap is kept (prepaid) for the charge it is
        for, since the chip's note can arrive before this loop has seen that CPU."""
        credit += prepaid + refund - used
        prepaid = max(0.0, credit - cap)
        return credit - prepaid, prepaid

    def _take_refund(self) -> float:
        with self._refund_lock:
            r, self._refund = self._refund, 0.0
        self.refunded_s += r
        return r

    def begin(self) -> None:
        """The firmware starts (lab boot's first note): charge CPU from now on."""
        self._begin.set()

    def _charged(self) -> float | None:
        try:
            sched = time.clock_gettime(self._clock)
            with open(f"/proc/{self.pid}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        u, s = int(st[11]), int(st[12])  # utime, stime in clock ticks (sampled; their ratio is fine)
        return sched * (u / (u + s)) if u + s else sched

    def _signal(self, sig: int) -> bool:
        try:
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def _run(self) -> None:
        while not self._begin.wait(0.05):
            if self._stop.is_set():
                return
        cap = self.BURST_S
        credit = cap
        last = time.monotonic()
        used_at = self._charged()
        if used_at is None:
            return
        running = True
        prepaid = 0.0  # refunds that came before the CPU they are for was charged
        while not self._stop.is_set():
            now = time.monotonic()
            credit = min(cap, credit + (now - last) * self.duty)
            last = now
            cpu = self._charged()
            if cpu is None:
                return  # the process is gone
            used = max(0.0, cpu - used_at)
            self.charged_s += used
            credit, prepaid = self.settle(credit, prepaid, used, self._take_refund(), cap)
            used_at = max(used_at, cpu)
            if credit > 0:
                if not running:
                    if not self._signal(signal.SIGCONT):
                        return
                    running = True
                # Sleep about as long as the credit lasts if the device runs flat out.
                self._stop.wait(max(0.0002, credit))
            else:
                if running:
                    if not self._signal(signal.SIGSTOP):
                        return
                    running = False
                wait = -credit / self.duty + self.BURST_S / self.duty / 4
                t0 = time.monotonic()
                self._stop.wait(min(wait, 0.5))
                self.stopped_s += time.monotonic() - t0
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        self._stop.set()
        self._begin.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._signal(signal.SIGCONT)


def _cpu_of(micropython: str, script: str, *args: str, env: dict[str, str] | None = None,
            user_only: bool = False) -> float:
    """CPU seconds (user + system, or user only) of one run of a lab probe in lab/ports."""
    proc = subprocess.Popen([micropython, str(PORTS_DIR / script), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    assert proc.stderr is not None
    err = proc.stderr.read()  # a few notes at most: the pipe never fills before the exit
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} probe failed (exit {proc.returncode}): "
                           f"{err.decode(errors='replace')[-300:]}")
    return float(ru.ru_utime if user_only else ru.ru_utime + ru.ru_stime)


@functools.lru_cache(maxsize=1)
def host_kernel_rate(micropython: str) -> float:
    """Kernel passes per CPU second of the unix MicroPython on this host (lab/ports/_speed.py),
    timed in CPU time so that other load on a shared machine does not make the board faster."""
    n = 20000
    best = 0.0
    for _ in range(3):
        dt = _cpu_of(micropython, "_speed.py", str(n)) - _cpu_of(micropython, "_speed.py", "0")
        if dt > 0:
            best = max(best, n / dt)
    if best <= 0:
        raise RuntimeError("could not measure the host's MicroPython speed")
    return best


@functools.lru_cache(maxsize=1)
def standin_costs(micropython: str) -> tuple[float, float]:
    """Host user-CPU seconds that one flash read (32 bytes) and one page program through the
    stand-ins (rp2.Flash over the NOR model; esp32.Partition is the same shape) cost above a
    native call of the same arity: on the boards those calls are C, so the throttle refunds this
    for each call the chip reports. The best of three runs, as host_kernel_rate."""
    with tempfile.TemporaryDirectory(prefix="mtr-cost-") as d:
        hw = {"board": "rp2", "flash": str(Path(d) / "flash.bin"), "flash_size": 64 * KiB,
              "erase_us": 0, "page_us": 0}
        (Path(d) / "hw.json").write_text(json.dumps(hw))
        env = dict(os.environ, MICROPYPATH=f"{PORTS_DIR}:{REPO / 'boards' / 'unix'}", MTR_HW=str(Path(d) / "hw.json"))
        costs = []
        for mode, n in (("read", 20000), ("program", 5000)):
            best = None
            for _ in range(3):
                dt = (_cpu_of(micropython, "_cost.py", mode, str(n), env=env, user_only=True)
                      - _cpu_of(micropython, "_cost.py", "native", str(n), env=env, user_only=True))
                best = dt if best is None else min(best, dt)
            costs.append(max(0.0, (best or 0.0) / n))
    return costs[0], costs[1]


def duty_for(board: str, micropython: str, speedup: float = 1.0) -> float:
    """The share of one host CPU that makes the unix MicroPython run at the board's speed
    (times `speedup`, for tests that want a faster board): board pystones / host pystones, with
    the host's pystones estimated from our kernel's rate measured now and the calibration ratio."""
    p = profile(board)
    host_pystones = host_kernel_rate(micropython) * PYSTONES_PER_PASS
    return min(1.0, p.pystones * speedup / host_pystones)


def lab_env(board: str, state_dir: Path) -> dict[str, str]:
    env = {
        "MICROPYPATH": f"{PORTS_DIR}:{REPO / 'boards' / 'unix'}",
        "MTR_HW": str(state_dir / "hw.json"),
    }
    return env


def measure(board: str, link: str = "usb", speed: float | None = 1.0) -> dict[str, Any]:
    """Boot to ready and one default `meterota upgrade` (factory 1.0.0 -> 1.1.0) of a fresh
    simulated board, as the README's lab-rig figures: `python -m meterota.lab.mcu --measure rp2`."""
    import shutil

    from .. import boards, image
    from ..store import Store
    from .sim import SimDevice

    base = Path(tempfile.mkdtemp(prefix=f"mtr-measure-{board}-"))
    try:
        dev = SimDevice(base / "dev", device_id=f"{board}-measure", board=board, link=link, speed=speed,
                        extra={"grace_ms": 0})
        t0 = time.monotonic()
        dev.start(timeout=600)
        boot = time.monotonic() - t0
        app = base / "app.bin"
        app.write_bytes(image.build_image(None, "1.1.0", slot_size=boards.slot_size(board), board=board))
        db = base / "r.db"
        with Store(db) as st:
            st.set_key(dev.device_id, dev.key)
        t0 = time.monotonic()
        r = subprocess.run([str(Path(sys.executable).parent / "meterota"), "--db", str(db), "--json", "upgrade",
                            "--port", dev.address[len("serial:"):], str(app)], capture_output=True, text=True)
        took = time.monotonic() - t0
        dev.stop()
        doc = json.loads(r.stdout) if r.returncode == 0 else {}
        up = doc.get("upload", {})
        return {"board": board, "link": link, "speed": speed, "boot_to_ready_s": round(boot, 1),
                "upgrade_rc": r.returncode, "upgrade_s": round(took, 1), "result": doc.get("result"),
                "upload_bytes": up.get("bytes"), "upload_s": up.get("seconds") and round(up["seconds"], 1),
                "upload_kBps": up.get("seconds") and round(up["bytes"] / up["seconds"] / 1000, 2),
                "timeouts": up.get("timeouts"), "rewinds": up.get("rewinds"), "uart_overruns": dev.overruns,
                "error": r.stderr.strip()[-200:] if r.returncode else None}
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover - calibration and figures helper
    import argparse

    ap = argparse.ArgumentParser(prog="python -m meterota.lab.mcu")
    ap.add_argument("--measure", choices=BOARDS, help="boot to ready and one default upgrade of this board")
    ap.add_argument("--link", choices=["usb", "uart"], default="usb")
    ap.add_argument("--speed", type=float, default=1.0, help="0 = unthrottled")
    a = ap.parse_args()
    mp = str(Path(sys.executable).parent / "micropython")
    if a.measure:
        print(json.dumps(measure(a.measure, a.link, a.speed or None)))
    else:
        print(f"kernel passes per CPU second on this host: {host_kernel_rate(mp):.0f}")
        for b in BOARDS:
            print(f"{b}: duty {duty_for(b, mp):.5f} of one CPU ({profile(b).pystone_source})")
