"""The rp2 board's slots on stock firmware are littlefs files, one per 4 KiB sector
(boards/rp2/board.py FileSectors). Under MicroPython's own littlefs (VfsLfs2 with the Pico's
_boot.py settings: progsize 256, readsize and lookahead 32, on a 1408 KiB region), an upload's
sector writes must stay cheap however full the slots are: littlefs compacts a directory's metadata
in time that grows with the square of its entries, and a Pico's watchdog (8.3 s at most) cannot
be stopped once a trial armed it.

Before the subdirectories and the one-commit rewrite, filling slot B beside a full slot A made one
sector's write cost up to 42,348 block reads (128 files in one directory); 4,984 with 16 files to
a subdirectory, 1,714 with 8."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import MP_PATH, REPO, run_mp

CODE = r"""
import os, sys, vfs
sys.path.insert(0, %(rp2)r)
import board, slots

class Ram:
    # The Pico's FS region as littlefs sees it (rp2.Flash's block protocol), counting reads.
    def __init__(self, blocks):
        self.mem = bytearray(b"\xff" * (blocks * 4096))
        self.blocks = blocks
        self.reads = 0
    def readblocks(self, n, buf, off=0):
        self.reads += 1
        a = n * 4096 + off
        buf[:] = self.mem[a:a + len(buf)]
    def writeblocks(self, n, buf, off=None):
        if off is None:
            self.ioctl(6, n)
            off = 0
        a = n * 4096 + off
        self.mem[a:a + len(buf)] = buf
    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return 4096
        if op == 6:
            self.mem[arg * 4096:(arg + 1) * 4096] = b"\xff" * 4096
        return 0

dev = Ram(352)
vfs.VfsLfs2.mkfs(dev, progsize=256)
vfs.mount(vfs.VfsLfs2(dev, progsize=256), "/fs")
os.chdir("/fs")

# What reading a sector holds: one open sector file for every FileSectors (littlefs's 1 KiB
# cache for it), where a copy of the sector took 4 KiB of a Pico's heap.
import gc
with open("probe", "wb") as f:
    f.write(b"\x01" * 4096)
b = bytearray(4)
gc.collect()
h0 = gc.mem_alloc()
probe = board.FileSectors("mtrp", 4)
os.rename("probe", "mtrp/000")
probe.readblocks(0, b)
assert b == b"\x01" * 4, b
gc.collect()
assert gc.mem_alloc() - h0 < 2048, gc.mem_alloc() - h0
probe.ioctl(6, 0)
probe.readblocks(0, b)
assert b == b"\xff" * 4, b
del probe

# A board deployed before the subdirectories: slot A's files flat under mtra/.
os.mkdir("mtra")
for n in range(20):
    with open("mtra/%%03d" %% n, "wb") as f:
        f.write(bytes([n]) * 4096)
a = board.FileSectors("mtra", 128)
b = bytearray(4)
for n in (0, 15, 16, 19):
    a.readblocks(n, b)
    assert b == bytes([n]) * 4, (n, b)
assert sorted(os.listdir("mtra")) == ["0", "1", "2"], os.listdir("mtra")
assert len(os.listdir("mtra/2")) == 4

# Slot A full, then an upload into slot B as device/upload.py writes it: each sector
# rewritten whole, then its progress byte programmed into the meta sector.
meta = board.FileSectors("mtrm", 4)
assert not meta.sharded
sa, sb = slots.Slot(a, 0), slots.Slot(board.FileSectors("mtrb", 128), 1)
buf = bytearray(4096)
worst = 0
for s, n in ((sa, k) for k in range(20, 128)):
    buf[:] = bytes([n]) * 4096
    s.rewrite(n, buf)
for n in range(128):
    dev.reads = 0
    buf[:] = bytes([n ^ 0x5A]) * 4096
    sb.rewrite(n, buf)
    meta.writeblocks(0, b"\x00", 16 + n)
    worst = max(worst, dev.reads)
for n in (0, 77, 127):
    sb.readinto(n * 4096 + 100, b)
    assert b == bytes([n ^ 0x5A]) * 4, (n, b)
    sa.readinto(n * 4096, b)
    assert b == bytes([n]) * 4, (n, b)

# Another instance costs its few attributes, not a buffer.
gc.collect()
h0 = gc.mem_alloc()
extra = board.FileSectors("mtrx", 4)
extra.readblocks(0, b)
gc.collect()
assert gc.mem_alloc() - h0 < 1024, gc.mem_alloc() - h0
del extra

# NOR rules through the files: a program only clears bits; an erase reads 0xFF.
sb.program(3, b"\x0f" * 256)
sb.readinto(3 * 4096, b)
assert b == bytes([(3 ^ 0x5A) & 0x0F]) * 4, b
# A program into part of a sector keeps the rest; into a sector without a file, 0xFF around it.
meta.ioctl(6, 2)
meta.writeblocks(2, b"\x12\x34", 1000)
meta.writeblocks(2, b"\x30", 1001)
got = bytearray(4096)
meta.readblocks(2, got)
assert got[:1000] == b"\xff" * 1000 and got[1000:1002] == b"\x12\x30" and got[1002:] == b"\xff" * 3094, got[996:1006]
meta.writeblocks(2, b"\x00" * 8, 4088)
meta.readblocks(2, got)
assert got[1000:1002] == b"\x12\x30" and got[4088:] == bytes(8) and got[1002:4088] == b"\xff" * 3086
for n in range(16):
    sb.erase(n)
sb.readinto(0, b)
assert b == b"\xff" * 4
assert sorted(os.listdir("mtrb"))[:2] == ["10", "11"], os.listdir("mtrb")  # 0 and 1 gave their pairs back
try:
    sb.rewrite(5, b"\x00" * 100)
    raise SystemExit("rewrite took part of a sector")
except OSError:
    pass

# A small filesystem: FileSectors.fits says how much image it takes (the upload's first request
# refuses more: INVALID_IMAGE_TOO_LARGE), and past that the write that finds no room raises
# ENOSPC (the upload answers FLASH_WRITE_FAILED) and what was written before stays readable.
vfs.umount("/fs")
os.chdir("/")
small = Ram(24)
vfs.VfsLfs2.mkfs(small, progsize=256)
vfs.mount(vfs.VfsLfs2(small, progsize=256), "/small")
fs = board.FileSectors("/small/mtrb", 64)
s = slots.Slot(fs, 1)
fit = 0
while s.fits((fit + 1) * 4096):
    fit += 1
assert 8 <= fit < 24 - board.RESERVE, fit
n = 0
try:
    while n < 64:
        buf[:] = bytes([n]) * 4096
        s.rewrite(n, buf)
        n += 1
    raise SystemExit("no ENOSPC")
except OSError as e:
    assert e.errno == 28, e
assert fit < n <= fit + board.RESERVE + 2, (fit, n)  # never admits more than fits; keeps RESERVE
for k in range(n):
    s.readinto(k * 4096 + 4095, memoryview(b)[:1])
    assert b[0] == k, (k, b[0])
assert s.fits(fit * 4096) is False   # full now
for k in range(n):
    s.erase(k)
assert s.fits(fit * 4096) and not s.fits((fit + 1) * 4096)
s.rewrite(0, buf)
assert s.fits(fit * 4096)   # sector 0 is replaced in place
print("fit", fit, "enospc at", n)

# Flat files of an older deploy on a filesystem with no room for the subdirectories: the slot
# stays flat and keeps its image (moving it would have failed half-way, at boot).
for k in range(n):
    s.erase(k)
os.mkdir("/small/mtrc")
k = 0
try:
    while True:
        with open("/small/mtrc/%%03d" %% k, "wb") as f:
            f.write(bytes([k]) * 4096)
        k += 1
except OSError:
    pass
old = board.FileSectors("/small/mtrc", 64)
assert not old.sharded and k > 8, k
old.readblocks(k - 1, memoryview(b)[:1])
assert b[0] == k - 1, b[0]
print("worst", worst)
"""


def test_slot_sector_writes_stay_cheap_on_littlefs(tmp_path: Path) -> None:
    out = run_mp(tmp_path, CODE % {"rp2": str(REPO / "boards" / "rp2")}, heap="4M").stdout
    worst = int(out.split()[-1])
    assert worst < 3000, f"one sector's write cost {worst} littlefs block reads"


UPLOAD = r"""
import sys, json, binascii, os, vfs
import board, receiver, updater, rp2board
%(ram)s
b = board.Board(%(dir)r)
small = Ram(40)  # 160 KiB of littlefs: room for the image, not for what the first request claims
vfs.VfsLfs2.mkfs(small, progsize=256)
vfs.mount(vfs.VfsLfs2(small, progsize=256), "/small")
b.slot_b = rp2board.FileSectors("/small/mtrb", 64)
updater.Updater(b).select_boot()
ctx, disp = receiver.build(b)
for h in json.loads(%(reqs)r):
    print(binascii.hexlify(disp.handle(binascii.unhexlify(h))).decode())
"""


def test_an_upload_the_filesystem_has_no_room_for_is_refused_at_its_first_request(tmp_path: Path) -> None:
    """Slot B as rp2 sector files on a littlefs too small for what the upload announces: the first
    request answers INVALID_IMAGE_TOO_LARGE (30) at once, where before the upload ran until a
    sector write failed (FLASH_WRITE_FAILED, after minutes on a Pico) and left the filesystem full;
    an image that fits is taken."""
    import hashlib
    import shutil

    import cbor2

    from meterota import image as img
    from test_protocol_vectors import _req, _state_dir

    d = _state_dir(tmp_path)
    shutil.copy(REPO / "boards" / "rp2" / "board.py", tmp_path / "rp2board.py")
    shutil.copy(REPO / "boards" / "rp2" / "boardinit.py", tmp_path / "boardinit.py")
    data = img.build_image(None, "1.1.0", slot_size=64 * 4096)
    assert len(data) < 100 * 1024
    first = {"off": 0, "data": data[:512], "image": 0, "sha": hashlib.sha256(data).digest()}
    reqs = [_req(2, 1, 1, cbor2.dumps(dict(first, len=240 * 1024))),
            _req(2, 1, 1, cbor2.dumps(dict(first, len=len(data))))]
    ram = CODE[CODE.index("class Ram:"):CODE.index("dev = Ram(352)")]
    code = UPLOAD % {"ram": ram, "dir": str(d), "reqs": json.dumps([r.hex() for r in reqs])}
    out = run_mp(tmp_path, code, heap="1M", env={"MICROPYPATH": f"{tmp_path}:{MP_PATH}"}).stdout.split()
    too_big, fits = (cbor2.loads(bytes.fromhex(x)[8:]) for x in out)
    assert too_big == {"err": {"group": 1, "rc": 30}}, too_big  # SMP v2: the image group's own code
    assert fits.get("rc", 0) == 0 and fits["off"] == 512, fits


FEED = r"""
import os, sys, vfs
sys.path.insert(0, %(rp2)r)
import board
%(ram)s
dev = Ram(64)
vfs.VfsLfs2.mkfs(dev, progsize=256)
vfs.mount(vfs.VfsLfs2(dev, progsize=256), "/fs")
os.chdir("/fs")
feeds = [0]
def feed():
    feeds[0] += 1
board._feed = feed
s = board.FileSectors("mtrb", 8)
s.writeblocks(0, b"\x5a" * 4096)
b = bytearray(512)
n0 = feeds[0]
for k in range(8):  # a module imported from one sector of the bundle: no sector move
    s.readblocks(0, b, k * 512)
print("reads-fed", feeds[0] - n0)
"""


def test_every_flash_read_of_an_armed_pico_feeds_its_watchdog(tmp_path: Path) -> None:
    """A request that reads within one sector (a lazily imported module, a hash over an image
    sector by sector in 512-byte reads) feeds the armed watchdog at each read, not only when
    the open sector file changes: on the simulated Pico at speed 1.0 an upload's last request
    (the read-back, imgcheck and policy imported from the bundle) took 10 s, past the RP2040's
    8.3 s, and a factory return was reset mid-upload (README, "Lab rig")."""
    ram = CODE[CODE.index("class Ram:"):CODE.index("dev = Ram(352)")]
    out = run_mp(tmp_path, FEED % {"rp2": str(REPO / "boards" / "rp2"), "ram": ram}, heap="1M").stdout
    assert "reads-fed 8" in out, out
