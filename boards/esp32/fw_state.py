# The ESP32's native firmware as the image group sees it at rest: the two OTA
# partitions as MCUboot images (FwSlot, FwTable: verified info, app descriptor,
# the trailer's flags) and the state they report. A state read loads this module
# alone (board.Firmware); fw_image.py adds the upload, test, confirm and the
# boot check on top of it. Layout and flags: fw_image.py.
from micropython import const
import esp32
import image

SECTOR = const(4096)
FLAGS_AT = const(3840)  # the trailer's last 256-byte page: one byte per flag, 0x00 = set
F_TEST = const(0)  # a state write asked to boot it (set_boot was called)
F_TRIED = const(1)  # it booted once on trial
F_OK = const(2)  # confirmed (or tested as permanent)
F_DONE = const(3)  # its test has an outcome (recorded)
MIN_APP = const(256)
IMAGE_NO = const(1)  # "image" in the state read


def _addr(part):
    return part.info()[2]


class FwSlot:
    """An OTA partition seen as the MCUboot image it was uploaded as."""

    def __init__(self, part, index):
        self.part = part
        self.index = index
        n = part.ioctl(4, 0)
        self.size = n * SECTOR  # the largest upload: payload + trailer sector
        self.tblock = n - 1
        self.tbase = (n - 1) * SECTOR
        self.hs = 0  # header region size, from the trailer's header
        self.pe = 0  # payload end in the image (hs + img_size)

    def readinto(self, off, mv):
        mv = memoryview(mv)  # slices of it are views, never copies
        n = len(mv)
        pos = 0
        while pos < n:
            o = off + pos
            if o < self.hs:  # header region: in the trailer
                a = self.tbase + o
                k = self.hs - o
            elif o < self.pe:  # payload: the app at the start of the partition
                a = o - self.hs
                k = self.pe - o
            else:  # TLV areas: in the trailer after the header region
                a = self.tbase + self.hs + o - self.pe
                k = n - pos
            k = min(k, n - pos)
            self.part.readblocks(a // SECTOR, mv[pos:pos + k], a % SECTOR)
            pos += k

    def read(self, off, n):
        b = bytearray(n)
        self.readinto(off, b)
        return b

    def erase(self, sector):
        self.part.ioctl(6, sector)

    def fits(self, length):
        return True  # an OTA partition holds its size (slots.Slot.fits)

    def invalidate(self):
        """Make the partition hold no image: trailer first, then the app's first block."""
        self.part.ioctl(6, self.tblock)
        self.part.ioctl(6, 0)


class FwTable:
    """The running (0) and the next (1) OTA partition, the SlotTable interface
    grp_image uses, plus the app descriptor of images not uploaded over SMP."""

    def __init__(self, running, nxt, cache=None):
        self.slots = (FwSlot(running, 0), FwSlot(nxt, 1))
        self.chunk = bytearray(1024)  # verification reads
        self.page = bytearray(256)  # the flags page
        self.hdr = bytearray(image.HEADER_SIZE)
        # What info() and desc() found, per partition (False: not read yet). The
        # board keeps these lists while this module is not loaded (board.Firmware),
        # so that a state read does not hash both partitions again.
        self._info, self._desc = cache or ([False, False], [False, False])
        self.busy = -1

    def __getitem__(self, i):
        return self.slots[i]

    def invalidate(self, i):
        self._info[i] = False
        self._desc[i] = False

    def info(self, i):
        """image.Info of the MCUboot image in partition i, or None."""
        if i == self.busy:
            return None
        v = self._info[i]
        if v is False:
            v = None
            s = self.slots[i]
            try:
                s.part.readblocks(s.tblock, self.hdr, 0)
                h = image.Header(self.hdr)
                if image.HEADER_SIZE <= h.hdr_size < FLAGS_AT and MIN_APP <= h.img_size <= s.tbase:
                    s.hs = h.hdr_size
                    s.pe = h.payload_end
                    v = image.verify(s, h.img_size + FLAGS_AT, self.chunk)
            except (ValueError, OSError):
                v = None
            self._info[i] = v
        return v

    def desc(self, i):
        """(version, app_elf_sha256) from the ESP app descriptor, or None."""
        if i == self.busy:
            return None
        v = self._desc[i]
        if v is False:
            v = None
            import firmware_ab  # for an image not uploaded over SMP, once per boot

            b = bytearray(256)
            try:
                self.slots[i].part.readblocks(0, b, 0)
                firmware_ab.check_app_image(b)
                ver = firmware_ab.version_tuple(firmware_ab.app_version(b))
                at = firmware_ab.APP_ELF_SHA_AT
                v = (ver or (0, 0, 0, 0), bytes(b[at:at + 32]))
            except (firmware_ab.FirmwareError, OSError, ValueError):
                v = None
            self._desc[i] = v
        return v

    def identity(self, i):
        """(version, hash) the state read reports for partition i, or None."""
        inf = self.info(i)
        if inf is not None:
            return inf.version, inf.hash
        return self.desc(i)

    def find_hash(self, h):
        for i in (0, 1):
            d = self.identity(i)
            if d is not None and d[1] == h:
                return i
        return -1

    def flags(self, i):
        s = self.slots[i]
        s.part.readblocks(s.tblock, self.page, FLAGS_AT)
        return self.page

    def set_flags(self, i, *which):
        """Program flag bytes to 0x00 (NOR: only clears bits, no erase)."""
        s = self.slots[i]
        p = self.page
        s.part.readblocks(s.tblock, p, FLAGS_AT)
        for f in which:
            p[f] = 0
        s.part.writeblocks(s.tblock, p, FLAGS_AT)

    def clear_flags(self, i):
        """Rewrite the trailer without its flags (to test an image again)."""
        s = self.slots[i]
        buf = bytearray(FLAGS_AT)
        s.part.readblocks(s.tblock, buf, 0)
        s.part.ioctl(6, s.tblock)
        s.part.writeblocks(s.tblock, buf, 0)

    # -- the state the image group reports ------------------------------------
    def flag(self, i, f):
        return self.info(i) is not None and self.flags(i)[f] == 0

    def trial(self):
        """The running firmware was tested and is not confirmed yet."""
        if self.info(0) is None:
            return False
        f = self.flags(0)
        return f[F_TEST] == 0 and f[F_OK] != 0 and f[F_DONE] != 0

    def pending(self):
        """The next reset boots the other partition (set_boot was called)."""
        try:
            boot = esp32.Partition(esp32.Partition.BOOT)
        except OSError:
            return False
        if _addr(boot) != _addr(self.slots[1].part):
            return False
        return not self.flag(1, F_TRIED)  # booted once already: a rollback, not a pending test

    def state_images(self):
        """The state read's image 1 entries."""
        trial = self.trial()
        out = []
        for i in (0, 1):
            inf = self.info(i)
            d = self.identity(i)
            if d is None:
                continue
            e = {"image": IMAGE_NO, "slot": i, "version": image.version_str(d[0]), "hash": d[1]}
            if inf is None or inf.bootable:
                e["bootable"] = True
            if i == 0:
                e["active"] = True
                if not trial:
                    e["confirmed"] = True
            else:
                if self.pending():
                    e["pending"] = True
                    if self.flag(1, F_OK):
                        e["permanent"] = True
                if trial:
                    e["confirmed"] = True  # the fallback
            out.append(e)
        return out
