"""Per-board rows of `make bench` (tools/bench.py --boards): the simulated Pico and ESP32
(meterota.lab: each board's own code, heap, CPU speed, flash timing and USB CDC / UART rules)
and the unix simulator, one device per board and link:

  * boot to ready: SimDevice.start() until the receiver prints ready (flash provisioned), and
    the flash chip's read calls meanwhile (SimDevice.flash_reads: littlefs's work);
  * the compression choice (meterota.rates) with the link rate the host measured, the
    board's inflate rate (the device's own counters after a compressed upload);
  * upload kB/s with the chosen compression, raw, and deflate, binary framing; and
    console framing (raw), each with the device's heap high-water (stats heap_peak,
    reset between uploads) and heap after boot;
  * time per upgrade: `meterota upgrade` (upload, test, reset into the trial image,
    verified confirmation), the real CLI.

    python tools/bench.py --boards [--quick]
    python tools/bench_boards.py [--quick] [--speed=X] [BOARD or BOARD/LINK ...]
    python tools/bench_boards.py --smallest-heap [--speed=X] [BOARD ...]   (heap bisection, speed 16)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "host"))

from meterota import boards as mboards  # noqa: E402
from meterota import protocol as P  # noqa: E402
from meterota import image as img  # noqa: E402
from meterota.client import SMPClient  # noqa: E402
from meterota.lab.sim import SimDevice  # noqa: E402
from meterota.store import Store  # noqa: E402
from meterota.transport import SerialTransport  # noqa: E402

BIN = Path(sys.executable).parent
KB = 1000
COMBOS = [("unix", "pty"), ("rp2", "usb"), ("rp2", "uart"), ("esp32", "usb"), ("esp32", "uart")]
WORD = 8  # bytes per word of this host's unix port: heap figures in 32-bit-equivalent KiB are / 2


def _kib32(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes * 4 / WORD / 1024, 1)


def _image(board: str, version: str, app: Path | None) -> bytes:
    arch = "host"  # the simulated boards run on this CPU (an image for the real board would also run)
    return img.build_image(app, version, slot_size=mboards.slot_size(board) if board != "unix"
                           else mboards.unix_slot_size(), board=None if board == "unix" else board, arch=arch)


def _device(base: Path, board: str, link: str, speed: float = 1.0) -> SimDevice:
    shutil.rmtree(base, ignore_errors=True)
    if board == "unix":
        return SimDevice(base, device_id="bench-unix")
    return SimDevice(base, device_id=f"bench-{board}-{link}", board=board, link=link, speed=speed)


def _client(dev: SimDevice, negotiate: bool = True) -> SMPClient:
    port = dev.address[len("serial:"):]
    t = SerialTransport(port)
    t.open()
    c = SMPClient(t, timeout=5.0)
    c.connect(negotiate=negotiate)
    return c


def _upload(dev: SimDevice, data: bytes, compress: bool | None, negotiate: bool = True) -> dict[str, Any]:
    c = _client(dev, negotiate)
    try:
        c.image_erase(1)
        c.request(P.Op.READ, P.Group.METEROTA, 2, {"reset_peak": True}, what="reset the heap high-water")
        st = c.upload(data, compress=compress)
        s = c.stats()
        return {"kBps": round(len(data) / st.seconds / KB, 1), "seconds": round(st.seconds, 2),
                "compressed": st.compressed, "wire_bytes": st.wire_bytes, "heap_peak": s.get("heap_peak"),
                "heap_peak_kib32": _kib32(s.get("heap_peak")), "why": st.compress_why,
                "inflate_bytes": s.get("inflate_bytes"), "inflate_us": s.get("inflate_us")}
    finally:
        c.t.close()


def _upgrade(dev: SimDevice, data_path: Path, db: Path) -> dict[str, Any]:
    with Store(db) as st:
        st.set_key(dev.device_id, dev.key)
    port = dev.address[len("serial:"):]
    t0 = time.monotonic()
    # The reset wait covers the simulated board's boot on a loaded two-core machine.
    p = subprocess.run([str(BIN / "meterota"), "--db", str(db), "--json", "upgrade", "--port", port,
                        "--reset-timeout", "600", str(data_path)], capture_output=True, text=True, timeout=1200)
    secs = time.monotonic() - t0
    try:
        doc = json.loads(p.stdout)
    except ValueError:
        doc = {}
    up = doc.get("upload") or {}
    return {"seconds": round(secs, 1), "rc": p.returncode, "result": doc.get("result"),
            "upload_kBps": round(up["bytes"] / up["seconds"] / KB, 1) if up.get("seconds") else None,
            "compressed": up.get("compressed"),
            "error": (p.stderr.strip().splitlines() or [""])[-1] if p.returncode else ""}


def realistic_app(app: Path) -> Path:
    """An application of realistic size in `app`: the first 12 meterota host modules' source
    as data files (.txt, stored as they are). Not as .py: the bundle compiles .py with mpy-cross,
    which refuses CPython syntax MicroPython lacks (cli.py's `{..., **info}`)."""
    shutil.rmtree(app, ignore_errors=True)
    app.mkdir(parents=True)
    for p in sorted((REPO / "host" / "meterota").glob("*.py"))[:12]:
        (app / (p.stem + ".txt")).write_bytes(p.read_bytes())
    return app


def measure(work: Path, quick: bool, log: Any = print, only: list[str] | None = None,
            speed: float = 1.0) -> list[dict[str, Any]]:
    rows = []
    app = None if quick else realistic_app(work / "boards-app")
    for board, link in COMBOS:
        if only and f"{board}/{link}" not in only and board not in only:
            continue
        row: dict[str, Any] = {"board": board, "link": link}
        base = work / f"board-{board}-{link}"
        dev = _device(base, board, link, speed)
        t0 = time.monotonic()
        try:
            dev.start(timeout=300)
        except Exception as e:  # noqa: report and go on
            row["error"] = f"start: {e}"
            rows.append(row)
            log(f"  {board}/{link}: {row['error']}")
            continue
        row["boot_s"] = round(time.monotonic() - t0, 2)
        row["boot_flash_reads"] = dev.flash_reads if board != "unix" else None
        try:
            data = _image(board, "1.1.0", app)
            path = base / "app.bin"
            path.write_bytes(data)
            row["image_bytes"] = len(data)
            c = _client(dev)
            try:
                s0 = c.stats()
                row["heap_after_boot"] = s0.get("heap_alloc")
                row["standin_heap"] = dev.standin_heap
                row["firmware_heap"] = dev.firmware_heap
                row["heap_total"] = (s0.get("heap_alloc") or 0) + (s0.get("heap_free") or 0)
                row["link_bps"] = c.link_rate()
            finally:
                c.t.close()
            for key, comp, neg in (("chosen", None, True), ("deflate", True, True), ("raw", False, True),
                                   ("console", False, False)):
                try:
                    row[key] = _upload(dev, data, comp, neg)
                except Exception as e:  # noqa: one failed mode must not hide the others
                    row[key] = {"error": f"{type(e).__name__}: {e}"}
            d = row["deflate"]
            if d.get("inflate_us"):
                row["inflate_Bps"] = round(d["inflate_bytes"] * 1e6 / d["inflate_us"])
            c = _client(dev)
            try:
                c.image_erase(1)  # the last upload left the image in the slot: the upgrade would skip its upload
            finally:
                c.t.close()
            row["upgrade"] = _upgrade(dev, path, base / "records.db")
        except Exception as e:  # noqa: report and go on
            row["error"] = f"{type(e).__name__}: {e}"
        finally:
            dev.stop()
        rows.append(row)
        log(f"  {board}/{link}: " + json.dumps({k: v for k, v in row.items() if k not in ("chosen", "deflate",
                                                                                         "raw", "console")}))
    return rows


def smallest_heaps(work: Path, boards: list[str], speed: float = 16.0, log: Any = print) -> list[dict[str, Any]]:
    """The smallest -X heapsize=NwK with which each simulated board boots and completes a deflate
    upload of the runtime-only image, both slots holding images (tools/bench.py's bisection, with
    3 sizes above it that must pass), and N less the heap in use when main.py started (a board's
    free heap at boot is measured after its firmware's _boot.py: the stand-ins, the root mount). The heap does
    not depend on the board's speed: the boards run at `speed` x theirs to make it quick."""
    import bench

    out = []
    for board in boards:
        t0 = time.monotonic()
        data = _image(board, "1.1.0", None)
        template = work / f"heap-{board}" / "template"
        dev = _device(template, board, "usb", speed)
        dev.start(timeout=300)
        try:
            c = _client(dev)
            try:
                c.image_erase(1)
                c.upload(data, compress=False)
            finally:
                c.t.close()
            standin = dev.standin_heap
            firmware = dev.firmware_heap
        finally:
            dev.stop()
        found, reliable = bench.smallest_heap(template, work / f"heap-{board}" / "probe", "deflate", data,
                                              lo=24, hi=160, window=3,
                                              board={"board": board, "link": "usb", "speed": speed})
        row = {"board": board, "bisection_wK": found, "smallest_wK": reliable, "standin_heap": standin,
               "firmware_heap": firmware,
               "net_kib32": None if reliable is None else round(reliable - (_kib32(firmware) or 0), 1),
               "seconds": round(time.monotonic() - t0)}
        log(f"  heap {board}: " + json.dumps(row))
        out.append(row)
    return out


def _net(r: dict[str, Any]) -> Any:
    """The deflate upload's high-water less the heap in use when main.py started (the lab's port
    stand-ins, C on a board, the root mount, the boot stage): a board's free heap at boot is
    measured after its firmware's own, so this is what the device code takes of it."""
    d = r.get("deflate")
    peak = d.get("heap_peak") if isinstance(d, dict) else None
    if peak is None:
        return "-"
    return _kib32(peak - (r.get("firmware_heap") or 0))


def table(rows: list[dict[str, Any]]) -> str:
    def g(r: dict[str, Any], k: str, f: str) -> Any:
        return r.get(k, {}).get(f) if isinstance(r.get(k), dict) else None

    out = ["| board / link | boot to ready s | flash reads to ready | link measured | inflate rate | choice | upload kB/s (chosen / raw / "
           "deflate / console) | upgrade s | heap after boot (32-bit KiB) | heap high-water raw / deflate / console "
           "(32-bit KiB) | stand-ins' Python / all before main.py (32-bit KiB) | deflate high-water net of what "
           "was there before main.py | budget (32-bit KiB) |",
           "|---|---:|---:|---:|---:|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r and "raw" not in r:
            out.append(f"| {r['board']} / {r['link']} | {r.get('boot_s', '-')} | {r['error']} |")
            continue
        link = r.get("link_bps")
        link_s = "fast (unresolved)" if link == float("inf") else (f"{link / KB:.0f} kB/s" if link else "-")
        infl = r.get("inflate_Bps")
        up = r.get("upgrade", {})
        out.append(
            f"| {r['board']} / {r['link']} | {r.get('boot_s')} | {r.get('boot_flash_reads') or '-'} | {link_s} | "
            f"{f'{infl / 1e6:.2f} MB/s' if infl else '-'} | {'deflate' if g(r, 'chosen', 'compressed') else 'raw'} | "
            f"{g(r, 'chosen', 'kBps') or '-'} / {g(r, 'raw', 'kBps') or '-'} / {g(r, 'deflate', 'kBps') or '-'} / "
            f"{g(r, 'console', 'kBps') or '-'} | "
            f"{up.get('seconds')}{'' if up.get('rc') == 0 else ' (' + str(up.get('error')) + ')'} | "
            f"{_kib32(r.get('heap_after_boot'))} | {g(r, 'raw', 'heap_peak_kib32')} / "
            f"{g(r, 'deflate', 'heap_peak_kib32')} / {g(r, 'console', 'heap_peak_kib32')} | "
            f"{_kib32(r.get('standin_heap')) or '-'} / {_kib32(r.get('firmware_heap')) or '-'} | {_net(r)} | "
            f"{_kib32(r.get('heap_total'))} |")
    return "\n".join(out)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    # --speed=X runs the boards at X times their calibrated speed: the heap figures hold, the rates
    # and times do not (they are the board's only at 1.0).
    speed = next((float(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--speed=")), 1.0)
    w = REPO / ".meterota" / "bench"
    w.mkdir(parents=True, exist_ok=True)
    only = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--smallest-heap" in sys.argv:
        # python tools/bench_boards.py --smallest-heap [--speed=X] [rp2 esp32]
        hs = smallest_heaps(w, only or ["rp2", "esp32"], speed if speed != 1.0 else 16.0)
        (REPO / "bench-boards-heap.json").write_text(json.dumps(hs, indent=1))
        sys.exit(0)
    rs = measure(w, quick, only=only or None, speed=speed)
    print(table(rs))
    (REPO / "bench-boards.json").write_text(json.dumps(rs, indent=1))
