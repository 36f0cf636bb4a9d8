# File-backed NOR flash for the unix board (simulator).
#
# It behaves like the SPI NOR under esp32.Partition and rp2.Flash: 4 KiB erase
# sectors, erase sets 0xFF, programming can only clear bits (asking to set one
# is an error here, a silent corruption on real parts). Power can be made to
# fail at the N-th erase/program, before it or in the middle of it (a torn
# operation), through MTR_POWERFAIL="N:before|torn:seed"; the process then
# exits with code 86 exactly as if the supply had dropped.
from micropython import const
import os
import sys
import micropython

SECTOR = const(4096)
_CHUNK = const(256)  # the model works a page at a time: its buffers are the simulator's, not the board's
EXIT_POWERFAIL = const(86)


@micropython.viper
def _and_check(dst: ptr8, src: ptr8, n: int) -> int:
    # dst &= src; returns the index of the first byte that would need a bit set, or -1.
    bad = -1
    for i in range(n):
        d = dst[i]
        s = src[i]
        if (s & (d ^ 0xFF)) and bad < 0:
            bad = i
        dst[i] = d & s
    return bad


class NorFlash:
    def __init__(self, path, size):
        self.size = size
        try:
            if os.stat(path)[6] != size:
                raise OSError
        except OSError:
            self._create(path, size)
        self.f = open(path, "r+b")
        self.scratch = bytearray(_CHUNK)
        self.smv = memoryview(self.scratch)
        self.ff = b"\xff" * _CHUNK
        self.ops = 0
        self.erases = 0
        self.programs = 0
        self.programmed = 0  # bytes
        self.fail_at = 0
        self.fail_mode = "before"
        spec = os.getenv("MTR_POWERFAIL")
        if spec:
            parts = spec.split(":")
            self.fail_at = int(parts[0])
            self.fail_mode = parts[1] if len(parts) > 1 else "before"
            if len(parts) > 2:
                import random

                random.seed(int(parts[2]))

    @staticmethod
    def _create(path, size):
        with open(path, "wb") as f:
            ff = b"\xff" * SECTOR
            for _ in range(size // SECTOR):
                f.write(ff)

    def _op(self):
        # Count one flash operation; True when power fails during this one.
        self.ops += 1
        if self.ops != self.fail_at:
            return False
        if self.fail_mode == "before":
            self._die()
        return True

    def _die(self):
        self.f.close()
        print("meterota: power fail at flash op", self.ops, self.fail_mode)
        sys.exit(EXIT_POWERFAIL)

    def _check(self, addr, n):
        if addr < 0 or n < 0 or addr + n > self.size:
            raise OSError(22)

    def read(self, addr, buf):
        self._check(addr, len(buf))
        self.f.seek(addr)
        self.f.readinto(buf)

    def erase(self, sector):
        addr = sector * SECTOR
        self._check(addr, SECTOR)
        torn = self._op()
        self.erases += 1
        self.f.seek(addr)
        if torn:
            import random

            # Part of the sector reached 0xFF, the rest kept its old bytes.
            k = random.getrandbits(12)
            while k > 0:
                self.f.write(memoryview(self.ff)[:min(k, _CHUNK)])
                k -= _CHUNK
            self._die()
        for _ in range(SECTOR // _CHUNK):
            self.f.write(self.ff)

    def program(self, addr, data):
        n = len(data)
        self._check(addr, n)
        torn = self._op()
        self.programs += 1
        self.programmed += n
        # A torn program lands only its first `cut` bytes, and byte `cut` gets some of its bits.
        cut = -1
        if torn:
            import random

            cut = random.getrandbits(16) % (n + 1)
        pos = 0
        while pos < n:
            k = min(_CHUNK, n - pos)
            mv = self.smv[:k]
            self.f.seek(addr + pos)
            self.f.readinto(mv)
            src = memoryview(data)[pos:pos + k]
            if torn and (cut < pos + k or pos + k == n):
                self._tear(mv, src, addr + pos, cut - pos)
            bad = _and_check(self.scratch, src, k)
            if bad >= 0:
                raise OSError(5)  # EIO: NOR cannot set a bit by programming
            self.f.seek(addr + pos)
            self.f.write(mv)
            pos += k

    def _tear(self, mv, src, addr, k):
        import random

        for i in range(k):
            mv[i] &= src[i]
        if k < len(src):
            mv[k] &= src[k] | random.getrandbits(8)
        self.f.seek(addr)
        self.f.write(mv)
        self._die()

    def stats(self):
        return {"ops": self.ops, "erases": self.erases, "programs": self.programs, "programmed": self.programmed}


class Partition:
    """A block device view of [offset, offset+size) with esp32.Partition's rules:
    3-argument writeblocks erases first, 4-argument programs only, ioctl(6) erases."""

    def __init__(self, flash, offset, size):
        if offset % SECTOR or size % SECTOR:
            raise ValueError("partition not sector aligned")
        self.flash = flash
        self.offset = offset
        self.size = size

    def _addr(self, block, off, n):
        a = block * SECTOR + off
        if a < 0 or a + n > self.size:
            raise OSError(22)
        return self.offset + a

    def readblocks(self, block, buf, off=0):
        self.flash.read(self._addr(block, off, len(buf)), buf)

    def writeblocks(self, block, buf, off=None):
        if off is None:
            a = self._addr(block, 0, len(buf))
            for s in range(len(buf) // SECTOR):
                self.flash.erase(a // SECTOR + s)
            off = 0
        self.flash.program(self._addr(block, off, len(buf)), buf)

    def ioctl(self, op, arg):
        if op == 4:
            return self.size // SECTOR
        if op == 5:
            return SECTOR
        if op == 6:
            self.flash.erase(self._addr(arg, 0, SECTOR) // SECTOR)
            return 0
        return 0
