# Image upload into a slot, one 4 KiB sector at a time.
#
# Incoming chunks fill a sector buffer; a full sector is erased once and
# programmed once. Both hashes (the MCUboot image hash and the SHA-256 of the
# whole file for `match`) are computed as the data streams, so the image is
# never held in RAM. The session (slot, len, sha) and one progress byte per
# finished sector live in a session sector of the meta partition, so an upload
# resumes at the last sector that reached flash, even after a power cut.
from micropython import const
import struct
import binascii
import hashlib
import image

SECTOR = const(4096)
_MAGIC = b"MTUS"
_HDR = "<4sBBHI32s"  # magic, slot, sha length, reserved, len, sha
_HDR_SIZE = const(44)  # calcsize(_HDR); + CRC-32 = 48
_DONE_AT = const(60)  # 0x00 once the image verified
_FAIL_AT = const(61)  # 0x00 when the upload was refused at its end
_MAP_AT = const(64)  # progress map: byte k = 0x00 when sector k is in flash
MAP_AT = _MAP_AT
# A sector a multicast session put in flash block by block: its map byte has
# bit b cleared for each BLOCK-sized block b in flash (the sector was erased
# before the first one); 0x00 once it is whole.
BLOCK = const(1024)

IDLE = const(0)
RUNNING = const(1)
DONE = const(2)


class Session:
    def __init__(self, meta, sector):
        self.meta = meta  # meta partition block device
        self.msec = sector  # the session sector's block number
        self.buf = bytearray(SECTOR)
        self.mv = memoryview(self.buf)
        self.page = bytearray(256)  # one NOR page for map/marker writes
        self.state = IDLE
        self.slot = None
        self.length = 0
        self.sha = b""
        self.off = 0
        self.hdr = None
        self.h_img = None
        self.h_file = None
        self.flushed = 0  # bytes in flash (a whole number of sectors, or length)
        self.need_rehash = False
        self.lent = None  # set by the multicast receiver while it holds the sector buffer
        self.sparse = False  # the map may hold sectors past off (a multicast's, or an earlier run's)

    # -- persistence -------------------------------------------------------
    def load(self, slots):
        """Find a session left in flash by an earlier run."""
        b = bytearray(_MAP_AT)
        self.meta.readblocks(self.msec, b, 0)
        if b[:4] != _MAGIC:
            return
        if binascii.crc32(memoryview(b)[:_HDR_SIZE]) != struct.unpack_from("<I", b, _HDR_SIZE)[0]:
            return
        _m, si, shalen, _r, length, sha = struct.unpack_from(_HDR, b)
        if si > 1 or shalen > 32:
            return
        self.slot = slots[si]
        self.length = length
        self.sha = sha[:shalen]
        if b[_FAIL_AT] != 0xFF:
            self.state = IDLE
            return
        if b[_DONE_AT] == 0:
            self.state = DONE
            self.off = self.flushed = length
            return
        # Count the sectors that reached flash.
        nsec = (length + SECTOR - 1) // SECTOR
        m = bytearray(min(nsec, SECTOR - _MAP_AT))
        self.meta.readblocks(self.msec, m, _MAP_AT)
        k = 0
        while k < len(m) and m[k] == 0:
            k += 1
        self.state = RUNNING
        self.off = self.flushed = min(k * SECTOR, length)
        self.need_rehash = True
        self.sparse = True

    def _write_meta(self, at, data):
        # Program one whole 256-byte page (rp2 programs pages only): read it,
        # clear the bits of `data` into it, program it back. Bytes already in
        # flash are programmed with their own value, which NOR leaves as is.
        base = at & ~0xFF
        p = self.page
        self.meta.readblocks(self.msec, p, base)
        for j in range(len(data)):
            p[at - base + j] &= data[j]
        self.meta.writeblocks(self.msec, p, base)

    def _mark(self, at):
        self._write_meta(at, b"\x00")

    # -- the upload --------------------------------------------------------
    def begin(self, slot, length, sha, hdr):
        self.meta.ioctl(6, self.msec)
        rec = bytearray(_HDR_SIZE + 4)
        struct.pack_into(_HDR, rec, 0, _MAGIC, slot.index, len(sha), 0, length, bytes(sha) + bytes(32 - len(sha)))
        struct.pack_into("<I", rec, _HDR_SIZE, binascii.crc32(memoryview(rec)[:_HDR_SIZE]))
        self._write_meta(0, rec)
        self.slot = slot
        self.length = length
        self.sha = bytes(sha)
        self.hdr = hdr
        self.off = self.flushed = 0
        self.h_img = hashlib.sha256()
        self.h_file = hashlib.sha256()
        self.need_rehash = False
        self.lent = None
        self.sparse = False
        self.state = RUNNING

    def rehash(self):
        """Rebuild the hashes over what an earlier run (or a multicast session)
        put in flash, from sector 0 on as far as it is all there."""
        self.h_img = hashlib.sha256()
        self.h_file = hashlib.sha256()
        self.off = self.flushed = 0
        hdr = self.hdr
        self.hdr = None
        self.lent = None
        self._skip()
        if self.hdr is None:
            self.hdr = hdr  # block 0 is still missing: the announced header stands
        self.need_rehash = False

    def mapped(self, sector):
        """The progress map byte of `sector` (0xFF nothing, 0x00 whole, else blocks)."""
        if sector >= SECTOR - _MAP_AT:
            return 0xFF
        at = _MAP_AT + sector
        self.meta.readblocks(self.msec, self.page, at & ~0xFF)
        return self.page[at & 0xFF]

    def put_block(self, sector, at, data):
        """Program one BLOCK-aligned block of a sector straight to flash (a
        multicast block), erasing the sector first if nothing of it is there."""
        m = self.mapped(sector)
        if m == 0xFF:
            self.slot.erase(sector)
        self.slot.bdev.writeblocks(sector, data, at)
        m &= ~(1 << (at // BLOCK)) & 0xFF
        used = min(SECTOR, self.length - sector * SECTOR)
        if m & ((1 << ((used + BLOCK - 1) // BLOCK)) - 1) == 0:
            m = 0
        self._write_meta(_MAP_AT + sector, bytes((m,)))
        self.need_rehash = True
        self.sparse = True

    def _skip(self):
        """Go over data already in flash at self.off (whole sectors, or blocks a
        multicast put there): read it back into the sector buffer for the
        hashes. True when off moved."""
        moved = False
        while self.sparse and self.off < self.length:
            k = self.off // SECTOR
            pos = self.off % SECTOR
            m = self.mapped(k)
            if m == 0 and pos == 0:
                n = min(SECTOR, self.length - self.off)
            elif m != 0xFF and pos % BLOCK == 0 and not (m >> (pos // BLOCK)) & 1:
                n = min(BLOCK, self.length - self.off)
            else:
                break
            self.slot.readinto(self.off, self.mv[pos:pos + n])
            if self.hdr is None:
                self.hdr = image.Header(self.buf)
            self._hash(self.mv[pos:pos + n])
            self.off += n
            moved = True
            if m == 0:
                self.flushed = self.off
            else:
                self._sector_end()
        return moved

    def cancel(self, erase_header):
        """Abandon the session; optionally erase the slot's first sector so the
        partial image can never be mistaken for an old valid one."""
        if self.state != IDLE:
            self._mark(_FAIL_AT)
        if erase_header and self.slot is not None:
            self.slot.erase(0)
        self.state = IDLE

    def _hash(self, mv):
        self.h_file.update(mv)
        end = self.hdr.hashed_size
        if self.off < end:
            self.h_img.update(mv[:min(len(mv), end - self.off)])

    def room(self, off, n):
        """Where `n` bytes at `off` go in the sector buffer, when they are the
        session's next bytes (or a new session's first) within one sector and
        the buffer holds nothing unflushed: a compressed block inflates there and
        write() then finds it in place. None otherwise."""
        if self.state == RUNNING:
            if off != self.off or self.need_rehash:
                return None
            pos = off % SECTOR
        elif off == 0:
            pos = 0  # no session uses the buffer
        else:
            return None
        if pos + n > SECTOR:
            return None
        return self.mv[pos:pos + n]

    def write(self, data):
        """Append data at self.off; flushes full sectors to flash. Stops early
        (off moved past the data) where a multicast already put data in flash."""
        self.lent = None
        n = len(data)
        i = 0
        while i < n:
            pos = self.off % SECTOR
            k = min(SECTOR - pos, n - i)
            self.mv[pos:pos + k] = data[i:i + k]
            self._hash(data[i:i + k])
            self.off += k
            i += k
            self._sector_end()
            if self.off % BLOCK == 0 and self._skip():
                return

    def _sector_end(self):
        pos = self.off % SECTOR
        if pos == 0 and self.off > self.flushed:
            self._flush(SECTOR)
        elif self.off == self.length and pos:
            self._flush(pos)

    def _flush(self, used):
        sector = (self.off - 1) // SECTOR
        for j in range(used, SECTOR):
            self.buf[j] = 0xFF  # programming 0xFF leaves NOR untouched
        if not self.sparse or self.mapped(sector) == 0xFF:
            self.slot.rewrite(sector, self.buf)
        else:
            # a multicast left blocks of it: the sector is erased but for those,
            # which the buffer holds too (programming only clears bits)
            self.slot.program(sector, self.buf)
        if sector < SECTOR - _MAP_AT:
            self._mark(_MAP_AT + sector)
        self.flushed = self.off

    def finish(self):
        """Called when off == length. Returns (image_hash_ok, match or None)."""
        digest = self.h_img.digest()
        match = (self.h_file.digest() == self.sha) if self.sha else None
        return digest, match

    def mark_done(self):
        self._mark(_DONE_AT)
        self.state = DONE

    def mark_failed(self):
        self._mark(_FAIL_AT)
        self.state = IDLE
