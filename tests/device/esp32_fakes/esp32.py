# A stand-in for MicroPython's esp32 module, for device tests under the unix
# port (tests/device/test_firmware_ab.py). Partitions live in the NOR flash
# model (boards/unix/norflash.py: erase sets 0xFF, programming only clears
# bits) with esp32.Partition's block rules: 3-argument writeblocks erases
# first, 4-argument programs only, ioctl(6, n) erases one 4 KiB block. The OTA
# data and the second-stage bootloader are modelled as ESP-IDF does them with
# CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE: set_boot() validates the app and
# marks it NEW; the bootloader makes a NEW app PENDING_VERIFY and boots it, and
# rolls a PENDING_VERIFY app back (ABORTED) on the next boot;
# mark_app_valid_cancel_rollback() makes the running app VALID.
# Every set_boot / mark_app_valid_cancel_rollback is appended to LOG (and
# written to stderr as a JSON line when ECHO is set).
import sys
import json
import norflash

SECTOR = 4096
ERR_OTA_VALIDATE_FAILED = -5379
ERR_NOT_SUPPORTED = -261

FLASH = None
TABLE = []  # (label, type, subtype, offset, size)
OTA = {"boot": None, "states": {}}  # otadata: the boot partition, each OTA app's state
ROLLBACK = True  # the bootloader supports app rollback
RUNNING_LABEL = None
LOG = []
ECHO = False


def log(*e):
    LOG.append(e)
    if ECHO:
        sys.stderr.write(json.dumps({"log": list(e)}) + "\n")


STATE = None  # a file keeping OTA across processes (a power cycle), or None


def setup(path, table, boot, rollback=True, state=None):
    global FLASH, TABLE, ROLLBACK, STATE
    end = max(t[3] + t[4] for t in table)
    FLASH = norflash.NorFlash(path, end)
    TABLE = list(table)
    OTA["boot"] = boot
    OTA["states"] = {}
    ROLLBACK = rollback
    STATE = state
    if state:
        try:
            with open(state) as f:
                OTA.update(json.load(f))
        except OSError:
            pass


def _save():
    if STATE:
        with open(STATE, "w") as f:
            json.dump(OTA, f)


def _row(label):
    for t in TABLE:
        if t[0] == label:
            return t
    return None


def _app_ok(part):
    b = bytearray(36)
    part.readblocks(0, b, 0)
    return b[0] == 0xE9 and b[32:36] == b"\x32\x54\xcd\xab"


def bootloader():
    """The second-stage bootloader at a reset: picks the app to run."""
    global RUNNING_LABEL
    cur = OTA["boot"]
    st = OTA["states"]
    if ROLLBACK:
        if st.get(cur) == "pending":  # reset before the app marked itself valid
            st[cur] = "aborted"
            for t in TABLE:
                if t[1] == 0 and t[0] != cur and st.get(t[0]) not in ("aborted", "invalid") and _app_ok(Partition(t[0])):
                    cur = t[0]
                    break
            OTA["boot"] = cur
        elif st.get(cur) == "new":
            st[cur] = "pending"
    RUNNING_LABEL = cur
    _save()
    return cur


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=4096):
        if id == Partition.BOOT:
            id = OTA["boot"]
        elif id == Partition.RUNNING:
            id = RUNNING_LABEL
        row = _row(id)
        if row is None:
            raise OSError(2)
        self.label, self.type, self.subtype, self.offset, self.size = row
        self.block_size = block_size
        self.dev = norflash.Partition(FLASH, self.offset, self.size)

    @staticmethod
    def find(type=0, subtype=0xFF, label=None, block_size=4096):
        return [Partition(t[0], block_size) for t in TABLE
                if t[1] == type and (subtype == 0xFF or t[2] == subtype) and (label is None or t[0] == label)]

    def info(self):
        return (self.type, self.subtype, self.offset, self.size, self.label, False)

    def readblocks(self, n, buf, off=0):
        self.dev.readblocks(n, buf, off)

    def writeblocks(self, n, buf, off=None):
        if off is None:
            self.dev.writeblocks(n, buf)
        else:
            self.dev.writeblocks(n, buf, off)

    def ioctl(self, op, arg):
        return self.dev.ioctl(op, arg)

    def set_boot(self):
        if not _app_ok(self):
            raise OSError(ERR_OTA_VALIDATE_FAILED)
        log("set_boot", self.label)
        OTA["boot"] = self.label
        OTA["states"][self.label] = "new" if ROLLBACK else "undefined"
        _save()

    def get_next_update(self):
        otas = [t[0] for t in TABLE if t[1] == 0 and 0x10 <= t[2] < 0x20]
        if not otas:
            raise OSError(2)
        if self.label in otas:
            return Partition(otas[(otas.index(self.label) + 1) % len(otas)])
        return Partition(otas[0])

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        log("mark_valid", RUNNING_LABEL)
        if not ROLLBACK:
            raise OSError(ERR_NOT_SUPPORTED)
        OTA["states"][RUNNING_LABEL] = "valid"
        _save()
