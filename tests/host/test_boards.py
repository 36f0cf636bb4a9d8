"""Board support checks: flash maps (layout.json, the ESP32 partition table),
the boards' pure parts on CPython and on the unix MicroPython, and a mypy check
of device/ + boards/<port>/ against the official MicroPython stubs of each port."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
BOARDS = REPO / "boards"
SECTOR = 4096
KiB = 1024
SLOT_MIN = 256 * KiB
META_MIN = 3 * SECTOR
FS_MIN = 128 * KiB
# MICROPY_HW_FLASH_STORAGE_BYTES of the stock boards (reference §2.1).
RP2_FS = {"pico": 1408 * KiB, "pico_w": 848 * KiB, "pico2": 3 * 1024 * KiB, "pico2_w": 2560 * KiB}
STUBS = {"esp32": "micropython-esp32-stubs", "rp2": "micropython-rp2-rpi-pico-w-stubs"}
STUBS_DIR = Path(os.environ.get("MTR_STUBS_DIR", REPO / ".venv" / "mpstubs"))
# mypy error codes that mean "this API does not exist on the port" (or is
# called with arguments it does not take). The rest (stub imprecision,
# Optional narrowing in untyped code) is reported, not failed.
API_CODES = {"attr-defined", "name-defined", "import-not-found", "import-untyped", "call-arg"}
# Modules the device code imports that live in the application bundle.
BUNDLE_MODULES = {"app"}


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def regions_ok(regions: dict[str, tuple[int, int]], start: int, end: int) -> None:
    """Aligned, inside [start, end), pairwise disjoint."""
    spans = sorted((o, o + s, n) for n, (o, s) in regions.items())
    for o, e, n in spans:
        assert o % SECTOR == 0 and (e - o) % SECTOR == 0, f"{n} not 4 KiB aligned: {o:#x}+{e - o:#x}"
        assert e > o, f"{n} is empty"
        assert start <= o and e <= end, f"{n} [{o:#x}, {e:#x}) outside [{start:#x}, {end:#x})"
    for (o1, e1, n1), (o2, e2, n2) in zip(spans, spans[1:]):
        assert e1 <= o2, f"{n1} overlaps {n2}"


def slots_ok(lay: dict) -> None:
    assert lay["slot_a"][1] >= SLOT_MIN and lay["slot_b"][1] >= SLOT_MIN
    assert lay["slot_a"][1] == lay["slot_b"][1], "A and B differ in size"
    assert lay["meta"][1] >= META_MIN


# -- the ESP32 partition table ------------------------------------------------
ESP_TYPES = {"app": 0x00, "data": 0x01}
ESP_SUBTYPES = {
    "app": {"factory": 0x00, "test": 0x20, **{f"ota_{i}": 0x10 + i for i in range(16)}},
    "data": {"ota": 0x00, "phy": 0x01, "nvs": 0x02, "coredump": 0x03, "nvs_keys": 0x04, "efuse": 0x05,
             "undefined": 0x06, "esphttpd": 0x80, "fat": 0x81, "spiffs": 0x82, "littlefs": 0x83},
}


def parse_partition_csv(text: str) -> list[dict]:
    """ESP-IDF partition CSV (gen_esp32part rules that matter here): name,
    type, subtype, offset, size[, flags]; explicit offsets; known keywords."""
    out = []
    for ln, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        f = [x.strip() for x in line.split(",")]
        f += [""] * (6 - len(f))
        assert len(f) == 6, f"line {ln}: too many fields"
        name, typ, sub, off, size, flags = f
        assert typ in ESP_TYPES, f"line {ln}: type {typ}"
        assert sub in ESP_SUBTYPES[typ], f"line {ln}: subtype {sub}"
        for fl in flags.split(":"):
            assert fl in ("", "encrypted", "readonly"), f"line {ln}: flag {fl}"
        assert len(name) <= 16, f"line {ln}: name longer than 16"
        out.append({"name": name, "type": typ, "subtype": sub, "offset": int(off, 0), "size": int(size, 0)})
    return out


@pytest.fixture(scope="module")
def esp32_layout() -> dict:
    return json.loads((BOARDS / "esp32" / "layout.json").read_text())


def test_esp32_partition_table(esp32_layout: dict) -> None:
    lay = esp32_layout["partitions"]
    parts = parse_partition_csv((BOARDS / "esp32" / lay["table"]).read_text())
    by = {p["name"]: p for p in parts}
    assert len(by) == len(parts), "duplicate names"
    flash = lay["flash_size"]
    for p in parts:
        # The partition table itself occupies 0x8000-0x8fff.
        assert p["offset"] >= 0x9000
        if p["type"] == "app":
            assert p["offset"] % 0x10000 == 0, f"{p['name']}: app partitions are 64 KiB aligned"
    regions_ok({p["name"]: (p["offset"], p["size"]) for p in parts}, 0x9000, flash)
    # The meterota partitions, as the board opens them by label.
    assert (by["mtr_meta"]["offset"], by["mtr_meta"]["size"]) == tuple(lay["meta"])
    assert (by["mtr_a"]["offset"], by["mtr_a"]["size"]) == tuple(lay["slot_a"])
    assert (by["mtr_b"]["offset"], by["mtr_b"]["size"]) == tuple(lay["slot_b"])
    assert (by["vfs"]["offset"], by["vfs"]["size"]) == tuple(lay["vfs"])
    assert all(by[n]["type"] == "data" for n in ("mtr_meta", "mtr_a", "mtr_b", "vfs"))
    slots_ok(lay)
    assert lay["vfs"][1] >= FS_MIN
    # Native A/B: two OTA app slots big enough for the OTA build, and otadata.
    assert by["otadata"]["subtype"] == "ota" and by["otadata"]["size"] == 0x2000
    for n in ("ota_0", "ota_1"):
        assert by[n]["subtype"] == n and by[n]["size"] >= 0x180000
        assert (by[n]["offset"], by[n]["size"]) == tuple(lay[n])


def test_csv_parser_rejects_bad_rows() -> None:
    with pytest.raises(AssertionError):
        parse_partition_csv("a, data, bogus, 0x9000, 0x1000\n")
    with pytest.raises(AssertionError):
        parse_partition_csv("a, data, nvs, 0x9000, 0x1000, 0\n")  # IDF takes no numeric flags


def test_esp32_stock_layout(esp32_layout: dict) -> None:
    board = load(BOARDS / "esp32" / "boardinit.py", "esp32_boardinit")
    st = esp32_layout["stock"]
    for key in ("meta_size", "slot_size", "slot_min", "fs_min"):
        assert board.STOCK[key] == st[key], f"board.STOCK[{key}] differs from layout.json"
    assert st["slot_min"] >= SLOT_MIN and st["meta_size"] >= META_MIN and st["fs_min"] >= FS_MIN
    for name, ex in st["examples"].items():
        vfs_off, vfs_size = ex["vfs"]
        got = board.stock_layout(vfs_size)
        assert got is not None, name
        assert {k: list(v) for k, v in got.items()} == {k: ex[k] for k in ("fs", "meta", "slot_a", "slot_b")}, name
        regions_ok({k: tuple(ex[k]) for k in ("fs", "meta", "slot_a", "slot_b")}, 0, vfs_size)
        assert ex["slot_b"][0] + ex["slot_b"][1] == vfs_size, "slots are carved from the end"
        assert ex["fs"][1] >= st["fs_min"]
        slots_ok(ex)
    # Every vfs size gives a valid carve or a refusal, never a bad one.
    for vfs_size in range(256 * KiB, 16 * 1024 * KiB, 36 * KiB):
        got = board.stock_layout(vfs_size)
        if got is None:
            assert vfs_size < st["meta_size"] + st["fs_min"] + 2 * st["slot_min"]
            continue
        regions_ok(dict(got), 0, vfs_size)
        assert got["fs"][1] >= st["fs_min"] and got["slot_a"][1] >= st["slot_min"]


def test_rp2_layouts() -> None:
    data = json.loads((BOARDS / "rp2" / "layout.json").read_text())
    board = load(BOARDS / "rp2" / "boardinit.py", "rp2_boardinit")
    assert set(data["boards"]) == set(RP2_FS) == set(board.layouts())
    for name, lay in data["boards"].items():
        fs_size = lay["fs_size"]
        assert fs_size == RP2_FS[name], name
        assert lay["fs_region"] == [lay["flash_size"] - fs_size, fs_size], "the FS region is the top of flash"
        assert {k: lay[k] for k in board.layouts()[name]} == board.layouts()[name], f"{name}: boardinit.py != layout.json"
        regions_ok({k: tuple(lay[k]) for k in ("fs", "meta", "slot_a", "slot_b")}, 0, fs_size)
        assert lay["fs"][0] == 0 and lay["slot_b"][0] + lay["slot_b"][1] == fs_size
        assert lay["fs"][1] >= FS_MIN, f"{name}: no room left for the device files"
        slots_ok(lay)
        assert board.variant_for(fs_size) == name


def test_unix_layout() -> None:
    lay = json.loads((BOARDS / "unix" / "layout.json").read_text())
    regions_ok({k: tuple(lay[k]) for k in ("meta", "slot_a", "slot_b")}, 0, lay["flash_size"])
    slots_ok(lay)


# -- the boards' block devices on the unix MicroPython -------------------------
MICROPYTHON = shutil.which("micropython", path=str(Path(sys.executable).parent)) or shutil.which("micropython")

SUB_SNIPPET = r"""
import sys
sys.path[:0] = [%(esp32)r, %(unix)r]  # esp32 board.py before the unix one
import norflash, board
f = norflash.NorFlash(%(flash)r, 16 * 4096)
part = norflash.Partition(f, 0, 16 * 4096)
s = board.Sub(part, 8 * 4096, 4 * 4096)
assert s.ioctl(4, 0) == 4 and s.ioctl(5, 0) == 4096
s.writeblocks(1, b"\x55" * 8192)              # 3-arg: erases 2 sectors, programs
b = bytearray(8192); s.readblocks(1, b); assert b == b"\x55" * 8192
s.writeblocks(1, b"\x11" * 256, 256)           # 4-arg: program only (0x55 & 0x11)
b = bytearray(256); s.readblocks(1, b, 256); assert b == b"\x11" * 256
s.ioctl(6, 1); b = bytearray(4096); s.readblocks(1, b); assert b == b"\xff" * 4096
b = bytearray(4); part.readblocks(10, b); assert b == b"\x55" * 4   # window maps to block 8 + n
for bad in ((3, 4090, 8), (4, 0, 1), (-1, 0, 1)):
    try:
        s.readblocks(bad[0], bytearray(bad[2]), bad[1]); raise SystemExit("no bound check %%r" %% (bad,))
    except OSError:
        pass
try:
    s.writeblocks(0, b"\x00" * 4, 0); s.writeblocks(0, b"\xff" * 4, 0); raise SystemExit("set a bit")
except OSError:
    pass
print("ok", f.stats()["erases"])
"""

FILES_SNIPPET = r"""
import sys
sys.path[:0] = [%(rp2)r]
import board
d = board.FileSectors("mtrx", 4)
b = bytearray(8); d.readblocks(1, b, 100); assert b == b"\xff" * 8
d.writeblocks(1, b"\x0f" * 256, 256); d.writeblocks(1, b"\xf0" * 256, 256)   # NOR: AND
b = bytearray(300); d.readblocks(1, b, 200); assert b[:56] == b"\xff" * 56 and b[56:] == bytes(244)
d.writeblocks(2, b"\x55" * 8192)
b = bytearray(8192); d.readblocks(2, b); assert b == b"\x55" * 8192
b = bytearray(4106); d.readblocks(1, b, 4090); assert b[6:] == b"\x55" * 4100
d.ioctl(6, 2); b = bytearray(4); d.readblocks(2, b); assert b == b"\xff" * 4
d2 = board.FileSectors("mtrx", 4)            # persisted
b = bytearray(4); d2.readblocks(3, b); assert b == b"\x55" * 4
try:
    d.readblocks(3, bytearray(8), 4090); raise SystemExit("no bound check")
except OSError:
    pass
print("ok")
"""


def run_mpy(code: str, cwd: Path) -> str:
    if MICROPYTHON is None:
        pytest.skip("no unix micropython")
    p = subprocess.run([MICROPYTHON, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.startswith("ok"), p.stdout + p.stderr
    return p.stdout


def test_esp32_sub_window_on_nor_model(tmp_path: Path) -> None:
    out = run_mpy(SUB_SNIPPET % {"unix": str(BOARDS / "unix"), "esp32": str(BOARDS / "esp32"),
                                 "flash": str(tmp_path / "flash.bin")}, tmp_path)
    assert int(out.split()[1]) == 3  # 2 erases by the 3-arg write, 1 by ioctl(6)


def test_rp2_file_sectors(tmp_path: Path) -> None:
    run_mpy(FILES_SNIPPET % {"rp2": str(BOARDS / "rp2")}, tmp_path)


# -- ESP32 native firmware A/B: image checks and the writer --------------------
def app_image(size: int = 10000, chip: int = 0) -> bytes:
    hdr = bytes([0xE9, 3, 2, 0x20]) + struct.pack("<I", 0x40080000) + bytes([0xEE, 0, 0, 0])
    hdr += struct.pack("<HBHH", chip, 0, 0, 0xFFFF) + bytes(4) + b"\x01"
    assert len(hdr) == 24
    seg = struct.pack("<II", 0x3F400020, 256)
    desc = struct.pack("<III", 0xABCD5432, 0, 0) + bytes(4) + b"v1.29.0".ljust(32, b"\0")
    body = hdr + seg + desc
    return body + bytes((i * 7) & 0xFF for i in range(size - len(body)))


def combined_image(boot_offset: int = 0x1000) -> bytes:
    boot = bytearray(0x10000 - boot_offset)
    boot[:24] = bytes([0xE9, 3, 2, 0x20]) + bytes(20)
    boot[24:32] = struct.pack("<II", 0x3FFF0030, 0x100)
    boot[0x8000 - boot_offset:0x8000 - boot_offset + 2] = b"\xaa\x50"
    return bytes(boot) + app_image()


class FakePartition:
    """esp32.Partition's block rules over a bytearray (NOR: programs AND)."""

    def __init__(self, blocks: int) -> None:
        self.mem = bytearray(b"\xff" * blocks * SECTOR)
        self.writes = 0

    def ioctl(self, op: int, arg: int) -> int:
        if op == 4:
            return len(self.mem) // SECTOR
        if op == 6:
            self.mem[arg * SECTOR:(arg + 1) * SECTOR] = b"\xff" * SECTOR
        return 0

    def writeblocks(self, n: int, buf, off: int | None = None) -> None:
        self.writes += 1
        if off is None:
            for k in range(len(buf) // SECTOR):
                self.ioctl(6, n + k)
            off = 0
        a = n * SECTOR + off
        self.mem[a:a + len(buf)] = bytes(x & y for x, y in zip(self.mem[a:a + len(buf)], bytes(buf)))

    def readblocks(self, n: int, buf, off: int = 0) -> None:
        a = n * SECTOR + off
        buf[:] = self.mem[a:a + len(buf)]


def test_firmware_image_checks() -> None:
    fw = load(BOARDS / "esp32" / "firmware_ab.py", "firmware_ab")
    fw.check_app_image(app_image())
    fw.check_app_image(app_image(chip=9), chip_id=9)
    assert fw.app_version(app_image()) == "v1.29.0"
    with pytest.raises(fw.FirmwareError, match="esp32s3"):
        fw.check_app_image(app_image(chip=9), chip_id=0)
    for boot_at in (0x1000, 0x0, 0x2000):  # ESP32/S2, S3/C3/C6, C5/P4
        img = combined_image(boot_at)
        with pytest.raises(fw.FirmwareError, match="combined|app descriptor"):
            fw.check_app_image(img)
        with pytest.raises(fw.FirmwareError, match="app descriptor"):
            fw.check_app_image(img[:SECTOR])  # the first block alone is enough
    merged0 = b"\xff" * 0x1000 + combined_image(0x1000)  # esptool merge_bin from 0x0
    with pytest.raises(fw.FirmwareError, match="offset 0"):
        fw.check_app_image(merged0)
    with pytest.raises(fw.FirmwareError, match="not an ESP image"):
        fw.check_app_image(b"\x3d\xb8\xf3\x96" + bytes(100))  # an MCUboot image


def test_firmware_writer() -> None:
    fw = load(BOARDS / "esp32" / "firmware_ab.py", "firmware_ab")
    img = app_image(3 * SECTOR + 1234)
    part = FakePartition(8)
    w = fw.Writer(len(img), hashlib.sha256(img).digest(), part=part)
    for i in range(0, len(img), 1000):
        w.write(img[i:i + 1000])
    assert w.finish() == hashlib.sha256(img).digest()
    assert bytes(part.mem[:len(img)]) == img
    assert bytes(part.mem[len(img):]) == b"\xff" * (len(part.mem) - len(img))
    # A combined firmware.bin is refused before anything reaches flash.
    bad = combined_image()
    part = FakePartition(32)
    w = fw.Writer(len(bad), part=part)
    with pytest.raises(fw.FirmwareError):
        w.write(bad[:5000])
    assert part.writes == 0 and part.mem == bytearray(b"\xff" * len(part.mem))
    with pytest.raises(fw.FirmwareError, match="does not fit"):
        fw.Writer(9 * SECTOR, part=FakePartition(8))
    w = fw.Writer(len(img), b"\0" * 32, part=FakePartition(8))
    w.write(img)
    with pytest.raises(fw.FirmwareError, match="SHA-256"):
        w.finish()


# -- type check against each port's stubs --------------------------------------
def stubs(port: str) -> Path:
    d = STUBS_DIR / port
    if not (d / "stdlib").is_dir() or importlib.util.find_spec("mypy") is None:
        subprocess.run(["sh", str(REPO / "tools" / "install_stubs.sh"), sys.executable], check=False,
                       capture_output=True, timeout=300)
    if not (d / "stdlib").is_dir() or importlib.util.find_spec("mypy") is None:
        pytest.skip(f"{STUBS[port]} / mypy not installable here (tools/install_stubs.sh)")
    return d


def mypy(port: str, files: list[Path]) -> list[tuple[str, str, str]]:
    """Run mypy with the port's stubs as the whole standard library; returns
    (location, message, code) of the errors in `files` (not in the stubs)."""
    d = stubs(port)
    env = dict(os.environ, MYPYPATH=str(d))
    cmd = [sys.executable, "-m", "mypy", "--custom-typeshed-dir", str(d), "--python-version", "3.11",
           "--check-untyped-defs", "--follow-imports=silent", "--show-error-codes", "--no-error-summary",
           "--no-color-output", "--cache-dir", "/dev/null", *map(str, files)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    errs = []
    for line in p.stdout.splitlines():
        m = re.match(r"(.+?:\d+): error: (.*)  \[([a-z-]+)\]$", line)
        if m and not m.group(1).startswith(str(d)) and not m.group(1).startswith(".venv"):
            errs.append((m.group(1), m.group(2), m.group(3)))
    return errs


def api_errors(errs: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    out = []
    for loc, msg, code in errs:
        if code == "import-not-found" and any(f'"{m}"' in msg for m in BUNDLE_MODULES):
            continue
        if code in API_CODES:
            out.append((loc, msg, code))
    return out


@pytest.mark.parametrize("port", ["esp32", "rp2"])
def test_device_code_uses_only_port_apis(port: str) -> None:
    files = sorted((REPO / "device").glob("*.py")) + sorted((BOARDS / port).glob("*.py"))
    errs = mypy(port, files)
    bad = api_errors(errs)
    assert not bad, "\n".join(f"{loc}: {msg} [{code}]" for loc, msg, code in bad)


BAD_API = {
    "esp32": ("import esp32\nesp32.Partition.nonexistent()\n", "attr-defined"),
    "rp2": ("import rp2\nrp2.Flash(start=0, length=4096)\n", "call-arg"),
}


@pytest.mark.parametrize("port", ["esp32", "rp2"])
def test_checker_catches_a_wrong_api(port: str, tmp_path: Path) -> None:
    src, code = BAD_API[port]
    bad = tmp_path / "bad_api.py"
    bad.write_text("def f():\n" + "".join("    " + ln + "\n" for ln in src.splitlines()))
    errs = api_errors(mypy(port, [bad]))
    assert any(c == code for _l, _m, c in errs), errs
    # A module the port does not have fails the same way.
    other = tmp_path / "bad_module.py"
    other.write_text("import rp2\n" if port == "esp32" else "import esp32\n")
    assert any(c == "import-not-found" for _l, _m, c in api_errors(mypy(port, [other])))


def test_uart_spec_under_micropython(tmp_path: Path) -> None:
    """The serial spec both MCU boards read from their configuration."""
    run_mpy(f"""
import sys
sys.path.insert(0, {str(BOARDS.parent / 'device')!r})
import linkcfg as link
assert link.uart_spec("uart:1:4:5") == (1, 4, 5, 115200)
assert link.uart_spec("uart:0:0:1:921600") == (0, 0, 1, 921600)
for bad in ("uart:1:4", "usb:1:2:3"):
    try:
        link.uart_spec(bad)
        raise SystemExit("accepted " + bad)
    except ValueError:
        pass
print("ok")
""", tmp_path)
