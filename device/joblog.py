# An append-only log of small CBOR records in a flash partition (a ring of
# 4 KiB sectors): how a concentrator keeps its jobs and per-meter results so a
# reboot mid-job loses nothing. Each sector starts with a header (magic, seq);
# each record is A5 | u16 len | CBOR | CRC-32. A torn record ends its sector's
# replay and later records go to a fresh sector. When the ring wraps, the
# oldest sector (the oldest history) is erased.
from micropython import const
import struct
import binascii
import cbor

SECTOR = const(4096)
_MAGIC = b"MTJL"
_HDR = const(8)
_REC = const(0xA5)


class JobLog:
    def __init__(self, bdev):
        self.bdev = bdev
        self.nsec = bdev.ioctl(4, 0)
        self.page = bytearray(256)
        self.cur = -1
        self.pos = SECTOR
        self.seq = 0

    def _sectors(self):
        found = []
        h = bytearray(_HDR)
        for i in range(self.nsec):
            self.bdev.readblocks(i, h, 0)
            if h[:4] == _MAGIC:
                found.append((struct.unpack_from("<I", h, 4)[0], i))
        found.sort()
        return found

    def replay(self, fn):
        """Call fn(record) for every record, oldest first; finds the append point."""
        hdr = bytearray(3)
        for seq, i in self._sectors():
            self.seq = seq
            self.cur = i
            pos = _HDR
            clean = True
            while pos + 3 <= SECTOR:
                self.bdev.readblocks(i, hdr, pos)
                if hdr[0] == 0xFF:
                    break
                n = (hdr[1] << 8) | hdr[2]
                if hdr[0] != _REC or pos + 3 + n + 4 > SECTOR:
                    clean = False
                    break
                body = bytearray(n + 4)
                self.bdev.readblocks(i, body, pos + 3)
                if binascii.crc32(memoryview(body)[:n]) != struct.unpack_from("<I", body, n)[0]:
                    clean = False  # torn: nothing after it in this sector counts
                    break
                try:
                    fn(cbor.loads(memoryview(body)[:n]))
                except ValueError:
                    pass
                pos += 3 + n + 4
            self.pos = pos if clean else SECTOR

    def append(self, rec):
        data = cbor.dumps(rec)
        n = len(data)
        need = 3 + n + 4
        if need > SECTOR - _HDR:
            raise ValueError("record too large")
        if self.cur < 0 or self.pos + need > SECTOR:
            self._next_sector()
        out = bytearray(need)
        out[0] = _REC
        out[1] = n >> 8
        out[2] = n & 0xFF
        out[3:3 + n] = data
        struct.pack_into("<I", out, 3 + n, binascii.crc32(data))
        self._program(self.cur, self.pos, out)
        self.pos += need

    def _next_sector(self):
        self.cur = (self.cur + 1) % self.nsec
        self.seq += 1
        self.bdev.ioctl(6, self.cur)
        self._program(self.cur, 0, _MAGIC + struct.pack("<I", self.seq))
        self.pos = _HDR

    def _program(self, block, at, data):
        # Whole 256-byte pages, read-modify-write (NOR leaves bytes it already holds).
        i = 0
        p = self.page
        while i < len(data):
            base = (at + i) & ~0xFF
            self.bdev.readblocks(block, p, base)
            k = min(len(data) - i, base + 256 - (at + i))
            o = at + i - base
            for j in range(k):
                p[o + j] &= data[i + j]
            self.bdev.writeblocks(block, p, base)
            i += k
