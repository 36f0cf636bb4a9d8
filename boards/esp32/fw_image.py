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
import sys
import time
import image
import grp_image
import upload
import firmware_ab
from smp import GroupError, arg
from updater import Refused
from bootstate import RES_OK, RES_KO

from fw_state import FLAGS_AT, F_TEST, F_TRIED, F_OK, F_DONE, MIN_APP, FwTable


class _Version:
    """What imgcheck.check_version needs of the running image."""

    def __init__(self, v):
        self.version = v


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

    # -- state (the table's: fw_state.py, which a state read loads alone) --------
    def _flag(self, i, f):
        return self.table.flag(i, f)

    def trial(self):
        """The running firmware was tested and is not confirmed yet."""
        return self.table.trial()

    def on_trial(self):
        return self.table.trial()

    def pending(self):
        """The next reset boots the other partition (set_boot was called)."""
        return self.table.pending()

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
        return self.table.state_images()

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
