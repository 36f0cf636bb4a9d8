# The RP2 board (Raspberry Pi Pico, Pico W, Pico 2, Pico 2 W on stock MicroPython).
#
# Flash: everything lives in the user filesystem region (rp2.Flash() cannot
# reach the firmware). Two layouts (layout.json, per board, chosen by the FS
# region size or config "variant"):
#  - "raw": meta, slot A, slot B are rp2.Flash(start=, len=) windows at the end
#    of the region and littlefs covers only the front. The STOCK frozen
#    _boot.py mounts littlefs over the whole region and, when that fails,
#    FORMATS THE WHOLE REGION; littlefs fails on a superblock smaller than the
#    device, so "raw" needs a firmware whose _boot.py mounts
#    rp2.Flash(start=0, len=FS) (a custom build). The board uses it only when
#    the mounted root FS really ends before the carve.
#  - "files" (stock firmware): the same meta/slot sizes, as block devices
#    backed by one littlefs file per 4 KiB sector under /mtr. An absent file
#    reads as erased (0xFF); erase removes it; a program rewrites it (littlefs
#    makes each rewrite atomic, so a power cut leaves the old or the new sector).
#    A slot's files sit 8 to a subdirectory (/mtra/14/115): littlefs compacts a
#    directory's metadata in time that grows with the square of its entries, and
#    with 128 files in one directory a single sector's write took up to 42,000
#    flash reads (16 to a directory: 5,000; 8: 1,700; tests/device/
#    test_rp2_file_sectors.py). Each subdirectory costs a metadata pair (8 KiB
#    per 32 KiB of slot): the price is room (boards/rp2/README.md).
#
# Links: config "serial" = "stdin" (USB CDC, flow-controlled by USB) or
# "uart:ID:TX:RX[:BAUD]"; on W boards config "wifi" + "udp_port" add UDP.
import json
import os
import sys
import time

SECTOR = 4096
_FF = memoryview(b"\xff" * 256)  # an erased page, to fill what a sector file does not hold
SHARD = 8  # sector files per subdirectory of a slot
RESERVE = 6  # 4 KiB blocks an upload leaves free: the meta files' rewrites, metadata compactions
CONFIG_PATH = "/config.json"
FILES_DIR = "/mtr"

# The armed trial watchdog's feed, called for every slot read, write and erase: reading the
# bundle's modules and hashing a slot through littlefs files takes seconds on a Pico, with no
# receiver loop to feed it, and a module imported from one sector reads it many times over
# without moving to another (an upload's last request took 10 s on the simulated Pico, past
# the RP2040's 8.3 s). Flash work progressing is not a hang.
_feed = None


class FileSectors:
    """A block device of `count` 4 KiB sectors stored as files DIR/NNN (DIR/K/NNN,
    SHARD sectors to a subdirectory K, when there are more than SHARD), with NOR rules:
    erased reads 0xFF, a program only clears bits, 2-argument writeblocks erases
    first (here: replaces whole sector files, one littlefs commit each), ioctl(6, n)
    erases sector n."""

    # One open sector file for every instance (meta, slot A, slot B), read in place:
    # littlefs gives an open file a 1 KiB cache, where a copy of the sector took
    # 4 KiB of a Pico's heap (12 KiB with one per instance); no call works on two
    # sectors at once.
    f = None  # that file (None: the sector has no file, all 0xFF)
    owner = None  # the instance whose sector it is
    cached = -1  # that sector's number
    size = 0  # bytes the file holds; past them the sector reads 0xFF

    def __init__(self, path, count):
        self.path = path
        self.count = count
        self.sharded = count > SHARD
        try:
            os.mkdir(path)
        except OSError:
            pass
        if self.sharded:
            had = "boardinit" in sys.modules  # Board.__init__ reading the flash map
            import boardinit  # boot-time code: not kept in the heap

            boardinit.unflatten(self, (2 * (-(-count // SHARD)) + RESERVE) * SECTOR)
            if not had:
                sys.modules.pop("boardinit", None)

    def _name(self, n):
        if self.sharded:
            return "%s/%d/%03d" % (self.path, n // SHARD, n)
        return "%s/%03d" % (self.path, n)

    def _mkdir(self, n):
        try:
            os.mkdir("%s/%d" % (self.path, n // SHARD))
        except OSError as e:
            if e.errno != 17:  # EEXIST; a full filesystem's ENOSPC is the write's error
                raise

    def fits(self, length):
        """Whether littlefs has room for `length` bytes of image here: the sector
        files and subdirectories not there yet, and RESERVE blocks to spare (an upload
        that filled the filesystem would leave no block for the boot state's writes).
        Sectors already there are replaced in place."""
        n = -(-length // SECTOR)
        need = n + RESERVE
        for k in range(-(-n // SHARD)) if self.sharded else (None,):
            d = self.path if k is None else "%s/%d" % (self.path, k)
            try:
                for ent in os.ilistdir(d):
                    if ent[0].isdigit() and int(ent[0]) < n:
                        need -= 1
            except OSError:
                need += 2  # a new subdirectory's metadata pair
        return self._free() >= need * SECTOR

    def _free(self):
        st = os.statvfs(self.path)
        # littlefs counts the blocks in use by walking the filesystem and may count one
        # twice: on a full one more than it has, and the free count wraps around.
        return st[0] * st[3] if st[3] <= st[2] else 0

    def _open(self, n):
        C = FileSectors
        if C.owner is self and C.cached == n:
            return
        self._close()
        try:
            f = open(self._name(n), "rb")
            C.size = f.seek(0, 2)
            C.f = f
        except OSError:
            C.size = 0
        C.owner = self
        C.cached = n

    @staticmethod
    def _close():
        C = FileSectors
        f = C.f
        C.f = C.owner = None
        C.size = 0
        if f is not None:
            f.close()

    def _drop(self, n):
        # sector n's file changes: the open handle no longer shows it
        if FileSectors.owner is self and FileSectors.cached == n:
            self._close()

    def _read(self, n, o, mv):
        """Bytes o.. of sector n into memoryview mv (within the sector)."""
        self._open(n)
        f = FileSectors.f
        size = FileSectors.size
        k = 0
        if f is not None and o < size:
            f.seek(o)
            k = f.readinto(mv[:min(len(mv), size - o)])
        while k < len(mv):  # erased reads 0xFF: a page at a time
            j = min(len(mv), k + 256)
            mv[k:j] = _FF[:j - k]
            k = j

    def _chk(self, n, off, ln):
        if n < 0 or off < 0 or n * SECTOR + off + ln > self.count * SECTOR:
            raise OSError(22)

    def _create(self, n):
        try:
            return open(self._name(n), "wb")
        except OSError:
            if not self.sharded:
                raise
            self._mkdir(n)  # the first sector of its subdirectory
            return open(self._name(n), "wb")

    def _store(self, n, data):
        if _feed is not None:
            _feed()  # flash work progressing is not a hang
        self._drop(n)
        with self._create(n) as f:
            f.write(data)

    def readblocks(self, n, buf, off=0):
        self._chk(n, off, len(buf))
        if _feed is not None:
            _feed()
        mv = memoryview(buf)
        pos = 0
        while pos < len(mv):
            n2, o2 = n + (off + pos) // SECTOR, (off + pos) % SECTOR
            k = min(len(mv) - pos, SECTOR - o2)
            self._read(n2, o2, mv[pos:pos + k])
            pos += k

    def writeblocks(self, n, buf, off=None):
        if off is None:
            # Erase and program whole sectors: each file is replaced as it stands
            # (one commit; removing it first cost littlefs two more).
            if len(buf) % SECTOR:
                raise OSError(22)  # as rp2.Flash: the erase takes whole sectors
            self._chk(n, 0, len(buf))
            mv = memoryview(buf)
            for s in range(len(buf) // SECTOR):
                self._store(n + s, mv[s * SECTOR:(s + 1) * SECTOR])
            return
        self._chk(n, off, len(buf))
        mv = memoryview(buf)
        pos = 0
        while pos < len(mv):
            n2, o2 = n + (off + pos) // SECTOR, (off + pos) % SECTOR
            k = min(len(mv) - pos, SECTOR - o2)
            self._program(n2, o2, mv[pos:pos + k])
            pos += k

    def _program(self, n, o, data):
        # NOR program: the new bytes AND the old ones, written in place (littlefs
        # commits the file when it is closed, so a power cut keeps the old bytes or
        # the new). A sector without a file gets one, 0xFF up to `o`.
        new = bytearray(len(data))
        self._read(n, o, memoryview(new))
        size = FileSectors.size
        for i in range(len(new)):
            new[i] &= data[i]
        if _feed is not None:
            _feed()
        self._drop(n)
        with open(self._name(n), "r+b") if size else self._create(n) as f:
            if size < o:
                f.seek(size)
                while size < o:
                    k = min(o - size, 256)
                    f.write(_FF[:k])
                    size += k
            else:
                f.seek(o)
            f.write(new)

    def ioctl(self, op, arg):
        if op == 4:
            return self.count
        if op == 5:
            return SECTOR
        if op == 6:
            self._chk(arg, 0, SECTOR)
            if _feed is not None:
                _feed()  # an image's erase removes up to a slot's worth of files
            self._drop(arg)
            try:
                os.remove(self._name(arg))
            except OSError:
                return 0  # erased already
            if self.sharded:
                # littlefs gives a directory a metadata pair (8 KiB): return it with
                # the subdirectory's last file
                try:
                    os.rmdir("%s/%d" % (self.path, arg // SHARD))
                except OSError:
                    pass  # not empty
            return 0
        return 0


class Board:
    name = "rp2"

    def __init__(self, config_path=CONFIG_PATH):
        self.t0 = time.ticks_ms()  # the start of this boot as the device code sees it (receiver: ready_ms)
        with open(config_path) as f:
            self.config = json.load(f)
        self._wdt = None
        self.variant = None  # boardinit.setup: the board variant (layouts()) and flash mode
        self.mode = "files"
        import boardinit  # the flash map is read once, at boot: its code does not stay in the heap

        boardinit.setup(self)
        sys.modules.pop("boardinit", None)

    def links(self, frame_max):
        import boardinit
        import linkcfg

        try:
            return linkcfg.open_links(self, frame_max, boardinit.serial, boardinit.udp)
        finally:
            for m in ("boardinit", "linkcfg"):
                sys.modules.pop(m, None)  # boot-time code: not kept in the heap

    def register(self, disp, ctx, images):
        """receiver.build's board hook, before the application is imported: a trial boot arms
        the watchdog here, so an image whose application hangs at import is reset and reverts
        too (armed in ready(), after the import, such a board hung until power-cycled)."""
        self._arm(ctx)

    def _arm(self, ctx):
        if not ctx.recovery and ctx.up.st.trial and self._wdt is None:
            import machine

            # RP2040's watchdog tops out at about 8.3 s (RP2350: 16.7 s).
            self._wdt = machine.WDT(timeout=min(8300, int(self.config.get("wdt_ms", 8000))))
            global _feed
            _feed = self._wdt.feed

    def ready(self, ctx):
        self._arm(ctx)
        self.feed()
        print("meterota: ready", ctx.device_id, self.variant, self.mode,
              "recovery" if ctx.recovery else "")

    def feed(self):
        if self._wdt is not None:
            self._wdt.feed()

    def reset(self):
        import machine

        time.sleep_ms(50)
        machine.reset()

    def stats(self):
        import gc

        return {"variant": self.variant, "mode": self.mode, "mem_free": gc.mem_free()}
