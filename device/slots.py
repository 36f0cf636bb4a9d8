# A/B slots over board block devices (esp32.Partition, rp2.Flash or the unix
# NOR model), all with 4 KiB blocks and MicroPython's block protocol:
# readblocks(n, buf, off), writeblocks(n, buf, off) programs without erasing,
# writeblocks(n, buf) erases then programs, ioctl(6, n) erases block n.
from micropython import const
import image

SECTOR = const(4096)
A = const(0)
B = const(1)


class Slot:
    def __init__(self, bdev, index):
        self.bdev = bdev
        self.index = index
        self.size = bdev.ioctl(4, 0) * SECTOR

    @property
    def name(self):
        return "AB"[self.index]

    def readinto(self, off, mv):
        self.bdev.readblocks(off // SECTOR, mv, off % SECTOR)

    def read(self, off, n):
        b = bytearray(n)
        self.readinto(off, b)
        return b

    def erase(self, sector):
        self.bdev.ioctl(6, sector)

    def program(self, sector, buf):
        self.bdev.writeblocks(sector, buf, 0)

    def fits(self, length):
        """Whether the board's storage has room for an image of `length` bytes in
        this slot: always for flash partitions, which hold their size; sectors kept
        as files share a filesystem (boards/rp2 FileSectors.fits)."""
        f = getattr(self.bdev, "fits", None)
        return f is None or f(length)

    def rewrite(self, sector, buf):
        """Erase and program whole sectors in one call (the block protocol's
        2-argument writeblocks): on sectors kept as littlefs files that is one
        commit, where an erase and a program were three."""
        self.bdev.writeblocks(sector, buf)


class SlotTable:
    """The slots (A and B, or a concentrator's image store) and a cache of what
    each verified as (None = no valid image)."""

    def __init__(self, *bdevs):
        self.slots = tuple(Slot(b, i) for i, b in enumerate(bdevs))
        self.chunk = bytearray(512)  # verification reads; never shared with the upload
        self._info = [False] * len(bdevs)  # False = not checked yet
        self.busy = -1  # slot with an unfinished upload: reported as empty

    def __getitem__(self, i):
        return self.slots[i]

    def invalidate(self, i):
        self._info[i] = False

    def info(self, i):
        """image.Info for slot i, or None; hashes the slot once per change."""
        if i == self.busy:
            return None
        v = self._info[i]
        if v is False:
            s = self.slots[i]
            v = image.verify(s, s.size, self.chunk)
            self._info[i] = v
        return v

    def find_hash(self, h):
        for i in range(len(self.slots)):
            inf = self.info(i)
            if inf is not None and inf.hash == h:
                return i
        return -1
