# Stand-in for the esp32 port's `esp32` module as meterota uses it:
# esp32.Partition over the board's partition table (ports/esp32/
# esp32_partition.c), on the lab's NOR model with the module flash's times
# (hw.json), the cache disabled (interrupts off) during each operation; and the
# bootloader's OTA state (otadata) with app rollback, as
# CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE gives every stock board since v1.21.
#
# Refuses what ESP-IDF refuses: an unknown label (ENOENT), reads/writes past
# the partition (ESP_ERR_INVALID_SIZE, OSError -260), a simple write that is
# not whole 4 KiB sectors (its erase_range, -260), ioctl(6) when block_size is
# not 4096 (-EINVAL), set_boot() of an image that does not validate (-5379),
# mark_app_valid_cancel_rollback() without OTA partitions (-261). As on the
# chip, programming is byte-granular and never sets a bit (the lab raises EIO).
from micropython import const
import json
import _hw
import _nor

_SECTOR = const(4096)
_ERR_INVALID_SIZE = const(-260)
_ERR_NOT_SUPPORTED = const(-261)
_ERR_OTA_VALIDATE_FAILED = const(-5379)
_APP_DESC_MAGIC = const(0xABCD5432)


def _table():
    return _hw.params()["partitions"]  # [label, type, subtype, offset, size]


def _otadata_path():
    return _hw.params()["otadata"]


def _ota_read():
    try:
        with open(_otadata_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _ota_write(st):
    with open(_otadata_path(), "w") as f:
        json.dump(st, f)


def _ota_labels():
    return [e[0] for e in _table() if e[1] == 0 and 0x10 <= e[2] < 0x20]


def boot():
    """The second-stage bootloader's OTA choice, run once per reset by the lab
    boot before the firmware starts: a NEW image boots PENDING_VERIFY; one
    still PENDING_VERIFY at the next reset is ABORTED and the other slot boots."""
    otas = _ota_labels()
    if not otas:
        return None
    st = _ota_read()
    cur = st.get("boot") or otas[0]
    state = st.get("state", "valid")
    if state == "new":
        state = "pending"
    elif state == "pending":
        cur = st.get("prev") or otas[0]
        state = "valid"
        st["aborted"] = st.get("boot")
    st["boot"] = cur
    st["state"] = state
    st["running"] = cur
    _ota_write(st)
    return cur


def _validate(part):
    # esp_image_verify, reduced to what tells an app image from anything else:
    # the image magic, a sane segment count, the app descriptor after segment 0.
    b = bytearray(64)
    part.readblocks(0, b, 0)
    if b[0] != 0xE9 or not 0 < b[1] <= 16:
        return False
    m = b[32] | b[33] << 8 | b[34] << 16 | b[35] << 24
    return m == _APP_DESC_MAGIC


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=4096):
        if block_size <= 0:
            raise ValueError()
        ent = None
        if isinstance(id, str):
            for want in (0, 1):  # app partitions first, then data (esp_partition_find_first)
                for e in _table():
                    if e[1] == want and e[0] == id:
                        ent = e
                        break
                if ent:
                    break
        elif id in (0, 1):
            st = _ota_read()
            label = (st.get("running") if id == 1 else st.get("boot")) or (_ota_labels() or [None])[0]
            if label is None:  # no OTA table: the factory app
                for e in _table():
                    if e[1] == 0:
                        label = e[0]
                        break
            for e in _table():
                if e[0] == label:
                    ent = e
        else:
            raise TypeError()
        if ent is None:
            raise OSError(2)  # ENOENT
        self._e = ent
        self._off = ent[3]
        self._size = ent[4]
        self._bs = block_size
        self._chip = _nor.chip()

    @staticmethod
    def find(type=0, subtype=0xFF, label=None, block_size=4096):
        out = []
        for e in _table():
            if e[1] != type or (subtype != 0xFF and e[2] != subtype):
                continue
            if label is not None and e[0] != label:
                continue
            out.append(Partition(e[0], block_size))
        return out

    def info(self):
        e = self._e
        return (e[1], e[2], e[3], e[4], e[0], False)

    def _addr(self, block_num, offset, n):
        a = block_num * self._bs + offset
        if block_num < 0 or offset < 0 or a + n > self._size:
            raise OSError(_ERR_INVALID_SIZE)
        return self._off + a

    def readblocks(self, block_num, buf, offset=0):
        self._chip.read(self._addr(block_num, offset, len(buf)), buf)

    def writeblocks(self, block_num, buf, offset=None):
        n = len(buf)
        if offset is None:
            a = self._addr(block_num, 0, n)
            if self._bs < _SECTOR:
                raise OSError(22)  # the read-modify-write path: not used by meterota
            if a % _SECTOR or n % _SECTOR:
                raise OSError(_ERR_INVALID_SIZE)  # esp_partition_erase_range
            for s in range(n // _SECTOR):
                self._chip.erase(a // _SECTOR + s)
        else:
            a = self._addr(block_num, offset, n)
        self._chip.program(a, buf)

    def ioctl(self, op, arg=0):
        if op in (1, 2, 3):
            return 0
        if op == 4:
            return self._size // self._bs
        if op == 5:
            return self._bs
        if op == 6:
            if self._bs != _SECTOR:
                return -22
            self._chip.erase(self._addr(arg, 0, _SECTOR) // _SECTOR)
            return 0
        return None

    def set_boot(self):
        if self._e[1] != 0:
            raise OSError(_ERR_OTA_VALIDATE_FAILED)
        if not _validate(self):
            raise OSError(_ERR_OTA_VALIDATE_FAILED)
        st = _ota_read()
        running = st.get("running")
        if self._e[0] != running:
            st["prev"] = running
            st["state"] = "new"
        st["boot"] = self._e[0]
        _ota_write(st)

    def get_next_update(self):
        otas = _ota_labels()
        if not otas:
            raise OSError(2)
        cur = _ota_read().get("running") or otas[0]
        i = otas.index(cur) if cur in otas else -1
        return Partition(otas[(i + 1) % len(otas)])

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        if not _ota_labels():
            raise OSError(_ERR_NOT_SUPPORTED)
        st = _ota_read()
        if st.get("state") == "pending":
            st["state"] = "valid"
            _ota_write(st)
