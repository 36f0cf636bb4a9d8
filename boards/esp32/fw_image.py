# ESP32 native firmware A/B over the SMP image group: image 1 beside the
# application bundles (image 0). The board registers it when the partition
# table has OTA app slots (Board.register).
#
# The host wraps the bare ESP app image (micropython.bin / *.app-bin) as the
# payload of an MCUboot image (`meterota image build --firmware`: imgtool sign,
# the same key, hash, signature and board TLVs as bundles, plus the protected
# KIND TLV "firmware"). An upload with `image` 3 or 4 (grp_image's
# FIRMWARE_IMAGES: MCUboot's numbers for image 1's slots) streams the payload
# through firmware_ab.Writer into the next OTA partition, where the ESP-IDF
# bootloader runs it, and keeps the rest of the MCUboot image in that
# partition's last sector, the trailer:
#
#   OTA partition  [ESP app image | free ... | trailer sector]
#   trailer        [MCUboot header region | TLV areas | 0xFF ... | flags page]
#
# Read through FwSlot, header + app + TLVs are the MCUboot image again: the
# SHA256 TLV is checked over what is in flash (image.verify) and the signature
# and version rules are the bundles' (policy.py).
#
# State write test (its hash): flag TEST, Partition.set_boot(); the next reset
# boots it. That first boot is the trial (flag TRIED; the board arms its WDT).
# Confirm (state write confirm, or the self-test of a self-confirming device)
# calls Partition.mark_app_valid_cancel_rollback(), then flags OK. A reset or
# a failure before that: the bootloader rolls back (the app was left pending
# verify); one without rollback support boots it again, and TRIED makes this
# module switch back itself. Outcomes go into the boot state like the bundles'
# (confirmation record with the firmware image's hash and version).
from micropython import const
import sys
import time
import esp32
import image
import grp_image
import upload
import firmware_ab
from smp import GroupError, arg
from updater import Refused
from bootstate import RES_OK, RES_KO

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


class _Version:
    """What imgcheck.check_version needs of the running image."""

    def __init__(self, v):
        self.version = v


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


class FwSession:
    """The upload session interface of upload.Session, in RAM: a firmware
    upload resumes within a boot (same sha), not across resets."""

    def __init__(self, table, chip_id):
        self.table = table
        self.chip = chip_id
        self.state = upload.IDLE
        self.slot = None
        self.length = 0
        self.sha = b""
        self.off = 0
        self.need_rehash = False
        self.hdr = None
        self.w = None  # firmware_ab.Writer of the payload
        self.tbuf = None  # header region + TLV areas, programmed into the trailer last
        self.h_img = None
        self.h_file = None

    def rehash(self):
        pass

    def begin(self, slot, length, sha, hdr):
        import hashlib

        self.w = None
        self.tbuf = None
        tl = hdr.hdr_size + length - hdr.payload_end
        self.tbuf = bytearray(b"\xff" * ((tl + 15) & ~15))
        self.w = firmware_ab.Writer(hdr.img_size, None, self.chip, slot.part, self._first_block, False)
        self.slot = slot
        self.length = length
        self.sha = bytes(sha)
        self.hdr = hdr
        self.off = 0
        self.h_img = hashlib.sha256()
        self.h_file = hashlib.sha256()
        self.state = upload.RUNNING

    def _first_block(self):
        # The payload's first block is an app image for this chip: the image
        # that was in the partition goes now, its trailer first.
        self.slot.invalidate()

    def write(self, data):
        mv = memoryview(data)
        hs = self.hdr.hdr_size
        pe = self.hdr.payload_end
        end = self.hdr.hashed_size
        n = len(mv)
        i = 0
        while i < n:
            o = self.off
            if o < hs:
                k = min(n - i, hs - o)
                self.tbuf[o:o + k] = mv[i:i + k]
            elif o < pe:
                k = min(n - i, pe - o)
                try:
                    self.w.write(mv[i:i + k])
                except firmware_ab.FirmwareError as e:
                    print("meterota: firmware refused:", e)
                    self.mark_failed()
                    self.table.busy = -1
                    raise GroupError(grp_image.INVALID_IMAGE_VECTOR_TABLE)
            else:
                k = n - i
                t = hs + o - pe
                self.tbuf[t:t + k] = mv[i:i + k]
            part = mv[i:i + k]
            self.h_file.update(part)
            if o < end:
                self.h_img.update(part if o + k <= end else part[:end - o])
            self.off += k
            i += k
        if self.off == self.length:
            # The trailer last: the partition holds an image only once it is all there.
            s = self.slot
            s.part.writeblocks(s.tblock, self.tbuf, 0)

    def finish(self):
        match = (self.h_file.digest() == self.sha) if self.sha else None
        return self.h_img.digest(), match

    def _free(self, state):
        self.w = None
        self.tbuf = None
        self.state = state

    def mark_done(self):
        self._free(upload.DONE)

    def mark_failed(self):
        self._free(upload.IDLE)

    def cancel(self, erase_header):
        if erase_header and self.slot is not None:
            self.slot.invalidate()
        self._free(upload.IDLE)


def chip_id(part):
    b = bytearray(16)
    try:
        part.readblocks(0, b, 0)
    except OSError:
        return None
    if b[0] != firmware_ab.ESP_IMAGE_MAGIC:
        return None
    return b[firmware_ab.CHIP_ID_AT] | (b[firmware_ab.CHIP_ID_AT + 1] << 8)


class FirmwareImages(grp_image.ImageGroup):
    """Image 1: the ESP32's own firmware, through the image group's commands."""

    def __init__(self, ctx, disp, running, nxt, cache=None):
        self.ctx = ctx
        t = FwTable(running, nxt, cache)
        super().__init__(ctx.up, disp, FwSession(t, chip_id(running)), t)

    # -- state --------------------------------------------------------------
    def _flag(self, i, f):
        return self.table.info(i) is not None and self.table.flags(i)[f] == 0

    def trial(self):
        """The running firmware was tested and is not confirmed yet."""
        if self.table.info(0) is None:
            return False
        f = self.table.flags(0)
        return f[F_TEST] == 0 and f[F_OK] != 0 and f[F_DONE] != 0

    def on_trial(self):
        return self.trial()

    def pending(self):
        """The next reset boots the other partition (set_boot was called)."""
        try:
            boot = esp32.Partition(esp32.Partition.BOOT)
        except OSError:
            return False
        nxt = self.table[1].part
        if _addr(boot) != _addr(nxt):
            return False
        return not self._flag(1, F_TRIED)  # booted once already: a rollback, not a pending test

    def running_version(self):
        d = self.table.identity(0)
        return None if d is None or d[0] == (0, 0, 0, 0) else d[0]

    def running_info(self):
        """Info of the confirmed running firmware (signature/counter checks), or None."""
        return None if self.trial() else self.table.info(0)

    def _ver(self, i):
        d = self.table.identity(i)
        return image.pack_version(d[0] if d else (0, 0, 0, 0))

    def _record(self, result, reason, i):
        inf = self.table.info(i)
        st = self.up.st
        st.record(result, reason, inf.hash if inf else bytes(32), self._ver(i), self._ver(1 - i),
                  int(time.time()))
        st.save()

    def state_images(self):
        t = self.table
        trial = self.trial()
        out = []
        for i in (0, 1):
            inf = t.info(i)
            d = t.identity(i)
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
                    if self._flag(1, F_OK):
                        e["permanent"] = True
                if trial:
                    e["confirmed"] = True  # the fallback
            out.append(e)
        return out

    # -- test / confirm / revert ----------------------------------------------
    def test(self, i, permanent):
        if i == 0:
            if permanent:
                self.confirm_running()
                return
            raise Refused("test-active")
        if self.trial() or self.up.st.trial:
            raise Refused("pending")  # one trial at a time; the running firmware is the fallback
        t = self.table
        inf = t.info(1)
        if inf is None or not inf.bootable:
            raise Refused("not-bootable")
        self.up.check_image(inf, self.running_info())
        f = t.flags(1)
        if f[F_TEST] != 0xFF or f[F_TRIED] != 0xFF or f[F_OK] != 0xFF or f[F_DONE] != 0xFF:
            t.clear_flags(1)  # tested before (an older firmware): a new test
        if permanent:
            t.set_flags(1, F_TEST, F_OK)
        else:
            t.set_flags(1, F_TEST)
        try:
            firmware_ab.activate(t[1].part, reset=False)  # set_boot(); the host resets
        except (firmware_ab.FirmwareError, OSError) as e:
            print("meterota: firmware set_boot failed:", e)
            t.set_flags(1, F_DONE)
            raise Refused("not-bootable")

    def confirm_running(self, reason="confirmed"):
        if not self.trial():
            return
        firmware_ab.mark_valid()
        self.table.set_flags(0, F_OK, F_DONE)
        self._record(RES_OK, reason, 0)

    def fail(self, reason):
        """The firmware on trial failed: record, switch back, reset."""
        self.table.set_flags(0, F_DONE)
        self._record(RES_KO, reason, 0)
        try:
            self.table[1].part.set_boot()  # the bootloader would roll back too; this also covers one without
        except OSError as e:
            print("meterota: set_boot of the previous firmware failed:", e)
        self.ctx.board.reset()

    def boot_check(self):
        """Once per boot: start a trial, finish a permanent switch, notice a
        rollback, or keep IDF from rolling back a confirmed firmware."""
        t = self.table
        f = t.flags(0) if t.info(0) is not None else None
        if f is not None and f[F_TEST] == 0 and f[F_DONE] != 0:
            if f[F_OK] == 0:
                firmware_ab.mark_valid()
                t.set_flags(0, F_DONE)
                self._record(RES_OK, "firmware made permanent", 0)
            elif f[F_TRIED] == 0:
                # A second boot of the trial: the bootloader did not roll back.
                self.fail("firmware trial: reset before confirm")
                return
            else:
                t.set_flags(0, F_TRIED)
        else:
            firmware_ab.mark_valid()
        if t.info(1) is not None and not self.pending():
            f = t.flags(1)
            if f[F_TEST] == 0 and f[F_DONE] != 0:
                why = "not confirmed before reset" if f[F_TRIED] == 0 else "did not boot"
                t.set_flags(1, F_DONE)
                self._record(RES_KO, "firmware rolled back: " + why, 1)

    def self_test(self, feed):
        """A self-confirming device's firmware trial: the app's selftest(), if any."""
        import updater

        why = updater.app_selftest(sys.modules.get("app"))
        feed()
        if why is None:
            self.confirm_running("firmware self-test passed")
        else:
            self.fail("firmware " + why)

    def erase_slot(self, logical):
        if logical == 0 or self.trial():
            raise Refused("in-use")
        t = self.table
        if self.pending():
            t[0].part.set_boot()  # the test is cancelled: boot the running firmware again
        s = self.session
        if s.state != upload.IDLE:
            s.cancel(False)
        t[1].invalidate()
        t.busy = -1
        t.invalidate(1)

    # -- upload hooks -------------------------------------------------------------
    def _target(self):
        return 1

    def _admit(self, target, hdr, req):
        s = self.table[target]
        length = arg(req, "len", int)
        if hdr.img_size < MIN_APP or hdr.flags & image.F_NON_BOOTABLE:
            raise GroupError(grp_image.INVALID_IMAGE_HEADER)
        if hdr.img_size > s.tbase or hdr.hdr_size + length - hdr.payload_end > FLAGS_AT:
            raise GroupError(grp_image.INVALID_IMAGE_TOO_LARGE)
        if self.trial() or self.pending():
            raise GroupError(grp_image.NO_FREE_SLOT)
        v = self.running_version()
        if arg(req, "upgrade", bool, False) and v is not None:
            if image.version_key(hdr.version) <= image.version_key(v):
                raise GroupError(grp_image.CURRENT_VERSION_IS_NEWER)
        import imgcheck  # loaded: _admit runs in imgcheck.first

        try:
            imgcheck.check_version(hdr, None if v is None else _Version(v), self.up.cfg)
        except Refused as r:
            raise imgcheck.refused(r)

    def _accept(self, inf):
        self.up.check_image(inf, self.running_info())
