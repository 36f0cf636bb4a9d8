# Stand-in for the rp2 port's `rp2` module as meterota uses it: rp2.Flash, the
# user-filesystem region of the board's QSPI flash (ports/rp2/rp2_flash.c),
# on the lab's NOR model with the W25Q16's times (hw.json: ~45 ms per 4 KiB
# sector erase, ~0.4 ms per 256-byte page), interrupts off meanwhile.
#
# Refuses what the port refuses: a window (start=, len=) not 4 KiB aligned or
# outside the region (ValueError). Where the port would silently corrupt or
# read past the region, the lab refuses too (the bug shows here, not in the
# field): an erase of a length that is not whole sectors, a program that is
# not 256-byte page aligned (the SDK's precondition; the SPI page program
# wraps inside its page), any access outside the window (OSError EINVAL).
from micropython import const
import _hw
import _nor

_SECTOR = const(4096)
_PAGE = const(256)


class Flash:
    def __init__(self, *, start=-1, len=-1):
        size = int(_hw.params()["flash_size"])
        if start == -1 and len == -1:
            start, len = 0, size
        else:
            if start == -1:
                start = 0
            if not (0 <= start < size and start % _SECTOR == 0):
                raise ValueError()
            if len == -1:
                len = size - start
            if not (0 < len and start + len <= size and len % _SECTOR == 0):
                raise ValueError()
        self._start = start
        self._len = len
        self._chip = _nor.chip()

    def _addr(self, block_num, offset, n):
        a = block_num * _SECTOR + offset
        if block_num < 0 or offset < 0 or a + n > self._len:
            raise OSError(22)
        return self._start + a

    def readblocks(self, block_num, buf, offset=0):
        self._chip.read(self._addr(block_num, offset, len(buf)), buf)

    def writeblocks(self, block_num, buf, offset=None):
        n = len(buf)
        if offset is None:
            a = self._addr(block_num, 0, n)
            if n % _SECTOR:
                raise OSError(22)  # flash_range_erase takes whole sectors
            for s in range(n // _SECTOR):
                self._chip.erase(a // _SECTOR + s)
        else:
            a = self._addr(block_num, offset, n)
        if a % _PAGE or n % _PAGE:
            raise OSError(22)  # flash_range_program: page-aligned start and length
        self._chip.program(a, buf)

    def ioctl(self, op, arg=0):
        if op in (1, 2, 3):  # init, deinit, sync
            return 0
        if op == 4:
            return self._len // _SECTOR
        if op == 5:
            return _SECTOR
        if op == 6:
            self._chip.erase(self._addr(arg, 0, _SECTOR) // _SECTOR)
            return 0
        return None
