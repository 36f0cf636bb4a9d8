# The ESP32 board (ESP32, -S2, -S3, -C3, -C6 ... with stock MicroPython).
#
# Flash: with the meterota partition table (partitions-meterota-4MiB.csv) the
# slots and the meta area are the data partitions mtr_a, mtr_b and mtr_meta,
# used directly as esp32.Partition objects. Without it ("stock" layout) they
# are carved from the END of the `vfs` partition through Sub windows, and the
# device filesystem is a FAT volume over the front of `vfs` only (see
# layout.json "stock" and README.md: the frozen _boot.py autodetects FAT and
# FatFs never looks past the size in its boot sector, whereas littlefs refuses
# to mount when its superblock and the partition disagree on the size).
#
# Links: config "serial" = "stdin" (the REPL console: native USB CDC, or UART0
# behind the USB-UART bridge) or "uart:ID:TX:RX[:BAUD]"; config "wifi" +
# "udp_port" add SMP over UDP. Reset is machine.reset(); a trial boot arms a
# machine.WDT (config "wdt_ms") fed from the receiver loop.
#
# Native firmware: with OTA app partitions (ota_0/ota_1) the board adds the
# MicroPython firmware itself as SMP image 1 (fw_image.py, uploads with
# `image` 3 or 4); a firmware trial boot arms the same watchdog.
import json
import sys
import time

try:
    import esp32
except ImportError:  # CPython (tests type-check this module)
    esp32 = None  # type: ignore

SECTOR = 4096
CONFIG_PATH = "/config.json"


class Sub:
    """A block window [first, first+count) blocks of a 4 KiB block device
    (an esp32.Partition), with the same rules: 3-argument writeblocks erases
    then programs, 4-argument programs only, ioctl(6, n) erases block n."""

    def __init__(self, dev, offset, size):
        if offset % SECTOR or size % SECTOR or size <= 0:
            raise ValueError("window not sector aligned")
        self.dev = dev
        self.first = offset // SECTOR
        self.count = size // SECTOR

    def _chk(self, n, off, ln):
        if n < 0 or off < 0 or n * SECTOR + off + ln > self.count * SECTOR:
            raise OSError(22)  # EINVAL

    def readblocks(self, n, buf, off=0):
        self._chk(n, off, len(buf))
        self.dev.readblocks(self.first + n, buf, off)

    def writeblocks(self, n, buf, off=None):
        if off is None:
            self._chk(n, 0, len(buf))
            self.dev.writeblocks(self.first + n, buf)
        else:
            self._chk(n, off, len(buf))
            self.dev.writeblocks(self.first + n, buf, off)

    def ioctl(self, op, arg):
        if op == 4:
            return self.count
        if op == 5:
            return SECTOR
        if op == 6:
            self._chk(arg, 0, SECTOR)
            return self.dev.ioctl(6, self.first + arg)
        return 0


class _Idle:
    state = 0  # upload.IDLE: what the firmware's session is while fw_image is not loaded


class Firmware:
    """Image 1 of the image group (the native firmware), with its code loaded only
    while a request needs it: fw_image.py and firmware_ab.py for a test, confirm,
    erase, the board's boot check or a firmware upload, during which they stay
    loaded (its session lives in RAM). Their code is 9.5 KiB (32-bit) of heap that
    a bundle's upload, the common case, no longer carries. What must outlive a load
    stays here: the verified images of both partitions (hashing an OTA partition
    again on every state read would take seconds) and image 1's state (its state
    read entries and trial flag): only a firmware request changes it, so a state
    read, several per upgrade, loads nothing once it is known (fw_state.py
    computes it when it is not)."""

    IDLE = _Idle()

    def __init__(self, ctx, disp, running, nxt):
        self.args = (ctx, disp, running, nxt)
        self.cache = ([False, False], [False, False])  # fw_image.FwTable's info and desc
        self.g = None  # fw_image.FirmwareImages while loaded
        self.trial_at_boot = None  # whether the firmware runs on trial, found by boot_check()
        self.known = None  # (state read entries, trial) while no firmware request changed them
        self.loads = 0  # times fw_image was loaded (each load costs the import)

    def _load(self):
        g = self.g
        if g is None:
            import fw_image

            g = self.g = fw_image.FirmwareImages(*self.args, cache=self.cache)
            self.loads += 1
        return g

    def _call(self, name, *args):
        self.known = None  # what fw_image does may change image 1's state
        try:
            return getattr(self._load(), name)(*args)
        finally:
            self._release()

    def _release(self):
        g = self.g
        if g is not None and g.session.state == 0:  # no upload in progress or done
            self.g = None
        if self.g is None:
            for m in ("fw_image", "fw_state", "firmware_ab"):
                sys.modules.pop(m, None)

    def _state(self):
        """(state read entries, trial) of image 1: kept, or found by the loaded group's
        table, or by fw_state.FwTable alone (a third of the code)."""
        if self.known is not None:
            return self.known
        if self.g is not None:
            t = self.g.table
            return t.state_images(), t.trial()  # an upload is open: not kept, it changes
        try:
            import fw_state

            t = fw_state.FwTable(self.args[2], self.args[3], self.cache)
            k = self.known = (t.state_images(), t.trial())
            return k
        finally:
            self._release()

    # What grp_image.ImageGroup and imgstate.py use of another image kind.
    @property
    def owner(self):
        return None if self.g is None else self.g.owner

    @property
    def session(self):
        return self.IDLE if self.g is None else self.g.session

    def _upload(self, req):
        return self._call("_upload", req)

    def _claim(self, same_image):
        return self._call("_claim", same_image)

    def state_images(self):
        return list(self._state()[0])

    def find_hash(self, h):
        for e in self._state()[0]:
            if e["hash"] == h:
                return e["slot"]
        return -1

    def test(self, i, permanent):
        return self._call("test", i, permanent)

    def on_trial(self):
        return self._state()[1]

    def confirm_running(self):
        # A state write `confirm` goes to every image kind: a bundle's confirm must not load
        # the firmware code when the firmware is not on trial (FirmwareImages does nothing then).
        if self._state()[1]:
            self._call("confirm_running")

    def erase_slot(self, logical):
        return self._call("erase_slot", logical)

    # What the board uses.
    def boot_check(self):
        """fw_image's once-per-boot check, and whether the firmware now runs on trial, in
        one load: board.ready() then needs no load of its own once the receiver is whole."""
        try:
            g = self._load()
            g.boot_check()
            t = g.table
            self.known = (t.state_images(), t.trial())
            self.trial_at_boot = self.known[1]
        finally:
            self._release()

    def trial(self):
        return self._state()[1]

    def fail(self, reason):
        return self._call("fail", reason)

    def self_test(self, feed):
        return self._call("self_test", feed)


class Board:
    name = "esp32"

    def __init__(self, config_path=CONFIG_PATH):
        self.t0 = time.ticks_ms()  # the start of this boot as the device code sees it (receiver: ready_ms)
        with open(config_path) as f:
            self.config = json.load(f)
        self._wdt = None
        self.layout = "?"
        self.fw = None  # Firmware (image 1) when the table has OTA app slots
        self._fw_checked = False  # its boot check runs once per boot, not per receiver
        self.meta = self.slot_a = self.slot_b = None  # boardinit.setup: the partitions or windows
        import boardinit  # the flash map is read once, at boot: its code does not stay in the heap

        boardinit.setup(self)
        sys.modules.pop("boardinit", None)

    # -- flash -------------------------------------------------------------
    # -- links -------------------------------------------------------------
    def links(self, frame_max):
        import boardinit
        import linkcfg

        try:
            return linkcfg.open_links(self, frame_max, boardinit.serial, boardinit.udp)
        finally:
            for m in ("boardinit", "linkcfg"):
                sys.modules.pop(m, None)  # boot-time code: not kept in the heap


    # -- native firmware -------------------------------------------------------
    def register(self, disp, ctx, images):
        """receiver.build's board hook: serve the firmware as image 1 of the
        image group, only when the partition table has OTA app slots. It runs before the
        application is imported: a trial boot arms the watchdog here, so an application that
        hangs at import is reset and reverts too."""
        if not ctx.recovery and ctx.up.st.trial and self._wdt is None:
            import machine

            self._wdt = machine.WDT(timeout=int(self.config.get("wdt_ms", 30000)))
        self.fw = None
        try:
            running = esp32.Partition(esp32.Partition.RUNNING)
            nxt = running.get_next_update()
        except OSError:
            return  # no OTA partitions: uploads to image 3/4 answer ENOTSUP
        import grp_image

        fw = self.fw = Firmware(ctx, disp, running, nxt)
        if not self._fw_checked:
            fw.boot_check()
        self._fw_checked = True
        images.add_image(grp_image.FIRMWARE_IMAGES, fw)

    # -- lifecycle -----------------------------------------------------------
    def ready(self, ctx):
        fw = self.fw
        fw_trial = False
        if fw is not None:
            fw_trial = fw.trial() if fw.trial_at_boot is None else fw.trial_at_boot
        if fw_trial and ctx.recovery:
            # The new firmware cannot run the application: go back to the old one.
            fw.fail("firmware trial: the application did not start")
        # A trial boot must keep the receiver loop alive: arm the watchdog.
        # (It cannot be stopped again on ESP32; feeding continues after confirm.)
        if ((not ctx.recovery and ctx.up.st.trial) or fw_trial) and self._wdt is None:
            import machine

            self._wdt = machine.WDT(timeout=int(self.config.get("wdt_ms", 30000)))
        if fw_trial and ctx.self_confirm:
            fw.self_test(self.feed)
        print("meterota: ready", ctx.device_id, self.layout, "recovery" if ctx.recovery else "")

    def feed(self):
        if self._wdt is not None:
            self._wdt.feed()

    def reset(self):
        import machine

        time.sleep_ms(50)  # let the last response leave
        machine.reset()

    def stats(self):
        import gc

        return {"layout": self.layout, "mem_free": gc.mem_free()}
