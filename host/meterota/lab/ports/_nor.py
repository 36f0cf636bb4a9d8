# The flash chip behind rp2.Flash and esp32.Partition: boards/unix/norflash.py's
# file-backed NOR model (4 KiB erase sectors, erase sets 0xFF, programming only
# clears bits, power cuts through MTR_POWERFAIL) plus the chip's time. Each
# erase and each page program stalls the board with interrupts off
# (_hw.stall): nothing else runs meanwhile, as on the real parts.
#
# On the boards rp2.Flash and esp32.Partition are C: a read is one native call.
# Here they are bytecode, which the lab's throttle would charge as the board's
# CPU (~1 us of host CPU a read, ~0.5 ms of a Pico's time at its speed; littlefs
# reads a slot directory in thousands of 32-byte reads). So the chip counts its
# reads and programs and tells the supervisor ("C<reads>,<programs>" every
# _NOTE_EVERY), which refunds their measured cost above a native call's
# (lab/mcu.py standin_costs).
from micropython import const
import _hw
import norflash

SECTOR = const(4096)
PAGE = const(256)
_NOTE_EVERY = const(64)

_chip = None


class Chip:
    def __init__(self, p):
        self.nor = norflash.NorFlash(p["flash"], p["flash_size"])
        self.erase_us = int(p["erase_us"])
        self.page_us = int(p["page_us"])
        self.busy_us = 0  # total time stalled, for stats
        self._reads = 0  # calls not yet told to the supervisor
        self._programs = 0

    def _count(self):
        if self._reads + self._programs >= _NOTE_EVERY:
            _hw.note("C%d,%d" % (self._reads, self._programs))
            self._reads = self._programs = 0

    def read(self, addr, buf):
        self.nor.read(addr, buf)
        self._reads += 1
        self._count()

    def erase(self, sector):
        self.nor.erase(sector)
        self._stall(self.erase_us)

    def program(self, addr, data):
        n = len(data)
        if n == 0:
            return
        self.nor.program(addr, data)
        self._programs += 1
        self._count()
        # Pages touched: the chip programs at most one 256-byte page per command.
        pages = (addr + n - 1) // PAGE - addr // PAGE + 1
        self._stall(pages * self.page_us)

    def _stall(self, us):
        self.busy_us += us
        _hw.stall(us)


def chip():
    global _chip
    if _chip is None:
        _chip = Chip(_hw.params())
    return _chip
