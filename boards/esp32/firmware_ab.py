# Native firmware A/B on ESP32: replace the MicroPython firmware itself
# (the second image kind, beside application bundles in mtr_a/mtr_b).
#
# Needs a partition table with ota_0/ota_1 + otadata (ESP32_GENERIC-OTA, or
# partitions-meterota-4MiB.csv) and a bootloader with app rollback
# (MicroPython >= v1.21 sets CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE).
#
#   w = firmware_ab.Writer(size, sha256)   # checks the slot exists and fits
#   w.write(chunk) ...                     # any chunk sizes; 4 KiB blocks to flash
#   w.finish()                             # read-back SHA-256 == sha256
#   firmware_ab.activate(w.part)           # set_boot() + machine.reset()
# after the reset, on the new firmware:
#   firmware_ab.trial_boot(selftest)       # WDT armed; mark valid only on success
#
# Only the bare app image (micropython.bin / *.app-bin) is accepted; a combined
# firmware.bin (bootloader + partition table + app) is refused from its first
# block, before anything is written: it passes a SHA check but never boots.
#
# Over SMP (fw_image.py) the image arrives wrapped as an MCUboot image; the
# payload streams through Writer and the rest (header, TLVs) goes to the last
# sector of the same partition.
import struct
import time

try:
    import esp32
except ImportError:  # CPython: the image checks are testable on the host
    esp32 = None  # type: ignore

BLOCK = 4096
ESP_IMAGE_MAGIC = 0xE9
APP_DESC_MAGIC = 0xABCD5432  # esp_app_desc_t.magic_word, right after the first segment header
APP_DESC_AT = 24 + 8  # esp_image_header_t (24 B) + esp_image_segment_header_t (8 B)
APP_VERSION_AT = APP_DESC_AT + 16  # esp_app_desc_t.version, char[32]
APP_ELF_SHA_AT = APP_DESC_AT + 144  # esp_app_desc_t.app_elf_sha256, 32 bytes
CHIP_ID_AT = 12  # esp_image_header_t.chip_id, u16
PART_TABLE_MAGIC = b"\xaa\x50"  # ESP_PARTITION_MAGIC 0x50AA, little-endian
# firmware.bin starts at the bootloader's flash offset (0x1000 on ESP32/S2,
# 0x0 on S3/C3/C6, 0x2000 on C5/P4); the partition table sits at 0x8000, so
# inside the file at 0x8000 - that offset.
PART_TABLE_IN_FILE = (0x7000, 0x8000, 0x6000)
CHIP_IDS = {0: "esp32", 2: "esp32s2", 5: "esp32c3", 9: "esp32s3", 12: "esp32c2", 13: "esp32c6",
            16: "esp32h2", 18: "esp32p4", 23: "esp32c5"}
ERR_OTA_VALIDATE_FAILED = -5379
ERR_NOT_SUPPORTED = -261


class FirmwareError(Exception):
    pass


def check_app_image(data, chip_id=None):
    """Raise FirmwareError unless `data` (at least the first 4 KiB of the
    file, more if available) is the start of a bare ESP-IDF app image."""
    if len(data) < APP_DESC_AT + 4:
        raise FirmwareError("image too short")
    if data[0] != ESP_IMAGE_MAGIC:
        if len(data) > 0x1000 and data[0x1000] == ESP_IMAGE_MAGIC and data[0] == 0xFF:
            raise FirmwareError("combined image from flash offset 0 (bootloader at 0x1000): "
                                "send micropython.bin / the .app-bin, not firmware.bin")
        raise FirmwareError("not an ESP image (magic 0x%02x, want 0xe9)" % data[0])
    for at in PART_TABLE_IN_FILE:
        if len(data) >= at + 2 and data[at:at + 2] == PART_TABLE_MAGIC:
            raise FirmwareError("combined firmware.bin (partition table at file offset 0x%x): "
                                "send micropython.bin / the .app-bin" % at)
    if struct.unpack_from("<I", data, APP_DESC_AT)[0] != APP_DESC_MAGIC:
        raise FirmwareError("no app descriptor: a bootloader or combined firmware.bin, "
                            "not an app image")
    chip = struct.unpack_from("<H", data, 12)[0]
    if chip_id is not None and chip != chip_id:
        raise FirmwareError("image is for %s, this chip is %s" % (
            CHIP_IDS.get(chip, chip), CHIP_IDS.get(chip_id, chip_id)))


def app_version(data):
    """The app descriptor's version string (esp_app_desc_t.version, 32 bytes at +16)."""
    v = bytes(data[APP_VERSION_AT:APP_VERSION_AT + 32])
    return v.split(b"\0")[0].decode()


def version_tuple(s):
    """"v1.24.1" or "v1.25.0-preview.12.gabc" -> (1, 24, 1, 0); None without x.y."""
    if s[:1] in ("v", "V"):
        s = s[1:]
    out = []
    for part in s.split(".")[:3]:
        k = 0
        while k < len(part) and "0" <= part[k] <= "9":
            k += 1
        if k == 0:
            break
        out.append(int(part[:k]))
        if k < len(part):
            break  # "0-preview": the number ends here
    if len(out) < 2 or out[0] > 255 or out[1] > 255 or (len(out) > 2 and out[2] > 65535):
        return None
    while len(out) < 3:
        out.append(0)
    return (out[0], out[1], out[2], 0)


def running():
    return esp32.Partition(esp32.Partition.RUNNING)


def target():
    """The OTA slot the next update goes to; FirmwareError without an OTA table."""
    try:
        return running().get_next_update()
    except OSError:
        raise FirmwareError("no OTA app partition (flash an OTA partition table)")


class Writer:
    """Streams an app image into the next OTA slot, one 4 KiB block at a time.

    first(): called once, after the first block passed check_app_image and
    before anything is written (fw_image.py invalidates the old image there).
    stream_hash=False: the caller hashes and verifies the slot itself; finish()
    is then not available."""

    def __init__(self, size, sha256=None, chip_id=None, part=None, first=None, stream_hash=True):
        import hashlib

        self.part = part if part is not None else target()
        cap = self.part.ioctl(4, 0) * BLOCK
        if size <= 0 or size > cap:
            raise FirmwareError("image of %d bytes does not fit the %d-byte slot" % (size, cap))
        self.size = size
        self.sha = sha256
        self.chip_id = chip_id
        self.first = first
        self.buf = bytearray(BLOCK)
        self.fill = 0
        self.block = 0
        self.got = 0
        self.h = hashlib.sha256() if stream_hash else None

    def write(self, data):
        mv = memoryview(data)
        if self.got + len(mv) > self.size:
            raise FirmwareError("more data than announced")
        while len(mv):
            k = min(len(mv), BLOCK - self.fill)
            self.buf[self.fill:self.fill + k] = mv[:k]
            self.fill += k
            self.got += k
            mv = mv[k:]
            if self.fill == BLOCK:
                self._flush()
        if self.got == self.size and self.fill:
            self._flush()

    def _flush(self):
        if self.block == 0:
            check_app_image(self.buf if self.fill == BLOCK else self.buf[:self.fill], self.chip_id)
            if self.first is not None:
                self.first()
        h = self.h
        if self.fill == BLOCK:
            self.part.writeblocks(self.block, self.buf)  # erases then programs
            if h is not None:
                h.update(self.buf)
        else:  # the short last block: erase, then program only what there is
            tail = memoryview(self.buf)[:self.fill]
            self.part.ioctl(6, self.block)
            self.part.writeblocks(self.block, tail, 0)
            if h is not None:
                h.update(tail)
        self.block += 1
        self.fill = 0

    def finish(self):
        """Check the stream hash and a read-back hash of the slot."""
        import hashlib

        if self.got != self.size:
            raise FirmwareError("short image: %d of %d bytes" % (self.got, self.size))
        if self.h is None:
            raise FirmwareError("no stream hash (stream_hash=False)")
        d = self.h.digest()
        if self.sha is not None and d != bytes(self.sha):
            raise FirmwareError("SHA-256 of the received image does not match")
        h = hashlib.sha256()
        left = self.size
        n = 0
        while left:
            k = min(BLOCK, left)
            b = self.buf if k == BLOCK else memoryview(self.buf)[:k]
            self.part.readblocks(n, b)
            h.update(b)
            left -= k
            n += 1
        if h.digest() != d:
            raise FirmwareError("read-back of the slot does not match what was written")
        return d


def activate(part, reset=True):
    """Make `part` boot next (IDF validates it) and hard-reset into it: a soft
    reset keeps running the old firmware."""
    try:
        part.set_boot()
    except OSError as e:
        if e.args and e.args[0] == ERR_OTA_VALIDATE_FAILED:
            raise FirmwareError("the bootloader rejects the image (not a valid app)")
        raise
    if reset:
        import machine

        time.sleep_ms(50)
        machine.reset()


def mark_valid():
    """Cancel the bootloader's rollback of the running app (idempotent; a
    bootloader without rollback support makes it a no-op)."""
    try:
        esp32.Partition.mark_app_valid_cancel_rollback()
    except OSError as e:
        if not (e.args and e.args[0] == ERR_NOT_SUPPORTED):  # no rollback in this bootloader
            raise


def trial_boot(selftest, wdt_ms=30000):
    """On the first boot of new firmware: arm a WDT, run selftest(feed) and
    only if it returns True mark the app valid (cancelling the rollback).
    A hang resets through the WDT, a failure resets at once; either way the
    bootloader goes back to the previous slot. Returns the WDT, which the
    caller keeps feeding."""
    import machine

    wdt = machine.WDT(timeout=wdt_ms)
    try:
        ok = selftest(wdt.feed)
    except Exception as e:
        print("firmware: self-test raised", repr(e))
        ok = False
    if not ok:
        print("firmware: self-test failed, rolling back")
        time.sleep_ms(50)
        machine.reset()
    mark_valid()
    return wdt
