# Power-safe boot state: two alternating records in two 4 KiB sectors of the
# meta partition. A save erases the sector that does NOT hold the newest record
# and programs the new one with seq + 1 and a CRC-32; a power cut anywhere
# leaves at least the previous record intact, and load() takes the valid
# record with the highest sequence number.
from micropython import const
import struct
import binascii

_MAGIC = b"MTBS"
REASON_MAX = const(64)  # bytes of UTF-8 kept per reason
_FMT = "<4sIBBBBIIB3x32s8s8sII64s64s"
_BODY = struct.calcsize(_FMT)
_SIZE = _BODY + 4  # + CRC-32
_SECTOR = const(4096)

NONE = const(0xFF)
RES_NONE = const(0)
RES_OK = const(1)
RES_KO = const(2)

_F_TRIAL = const(1)  # the active slot is on its trial boot, not confirmed
_F_PERMANENT = const(2)  # the pending slot was marked permanent (no trial)


def _text(b):
    i = b.find(b"\0")
    return str(b if i < 0 else b[:i], "utf-8")


def _field(s, n):
    b = s.encode()[:n]
    while b:  # never cut a UTF-8 sequence in half
        try:
            str(b, "utf-8")
            break
        except UnicodeError:
            b = b[:-1]
    return b + bytes(n - len(b))


class BootState:
    def __init__(self, bdev, first_sector=0):
        self.bdev = bdev
        self.first = first_sector
        self.seq = 0
        self.valid = False
        self.active = NONE
        self.pending = NONE
        self.flags = 0
        self.boots = 0
        # The latest outcome of a test: what the confirmation record reports.
        self.result = RES_NONE
        self.rseq = 0
        self.rhash = bytes(32)
        self.rver = bytes(8)
        self.rprev = bytes(8)
        self.rtime = 0
        self.rboots = 0
        self.reason = ""  # reason of the latest outcome
        self.revert_reason = ""  # reason of the latest revert, kept across OKs

    # -- flags as properties so callers read plainly
    @property
    def trial(self):
        return bool(self.flags & _F_TRIAL)

    @trial.setter
    def trial(self, on):
        self.flags = (self.flags | _F_TRIAL) if on else (self.flags & ~_F_TRIAL)

    @property
    def permanent(self):
        return bool(self.flags & _F_PERMANENT)

    @permanent.setter
    def permanent(self, on):
        self.flags = (self.flags | _F_PERMANENT) if on else (self.flags & ~_F_PERMANENT)

    def load(self):
        best = None
        buf = bytearray(_SIZE)
        for i in (0, 1):
            try:
                self.bdev.readblocks(self.first + i, buf, 0)
            except OSError:
                continue
            if buf[:4] != _MAGIC:
                continue
            if binascii.crc32(memoryview(buf)[:_BODY]) != struct.unpack_from("<I", buf, _BODY)[0]:
                continue
            seq = struct.unpack_from("<I", buf, 4)[0]
            if best is None or seq > best[0]:
                best = (seq, bytes(buf))
        if best is None:
            self.valid = False
            return False
        (_m, self.seq, self.active, self.pending, self.flags, self.result, self.boots,
         self.rseq, _pad, self.rhash, self.rver, self.rprev, self.rtime, self.rboots,
         reason, revert) = struct.unpack_from(_FMT, best[1])
        self.reason = _text(reason)
        self.revert_reason = _text(revert)
        self.valid = True
        return True

    def save(self):
        self.seq += 1
        rec = bytearray(_SIZE)
        struct.pack_into(_FMT, rec, 0, _MAGIC, self.seq, self.active, self.pending,
                         self.flags, self.result, self.boots, self.rseq, 0, self.rhash, self.rver,
                         self.rprev, self.rtime, self.rboots, _field(self.reason, REASON_MAX),
                         _field(self.revert_reason, REASON_MAX))
        struct.pack_into("<I", rec, _BODY, binascii.crc32(memoryview(rec)[:_BODY]))
        sector = self.first + (self.seq & 1)
        self.bdev.ioctl(6, sector)
        # Program a whole page-aligned block: NOR pages are 256 B on rp2.
        page = bytearray(b"\xff" * 256)
        page[:_SIZE] = rec
        self.bdev.writeblocks(sector, page, 0)
        self.valid = True

    def record(self, result, reason, info_hash, ver, prev, now):
        """Note the outcome of a test; the confirmation record is built from this."""
        self.result = result
        self.rseq += 1
        self.rhash = bytes(info_hash)
        self.rver = ver
        self.rprev = prev
        self.rtime = now
        self.rboots = self.boots
        self.reason = reason
        if result == RES_KO:
            self.revert_reason = reason
