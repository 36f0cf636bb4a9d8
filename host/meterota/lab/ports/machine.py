# Stand-in for the `machine` module of the rp2 and esp32 ports, the parts
# meterota's boards use, with the chip's limits (hw.json "chip"):
#   reset() / soft_reset() / reset_cause() / unique_id() / freq() / idle()
#   WDT(id=0, timeout=5000): RP2040 refuses timeout > 8388 ms ("timeout exceeds
#     8388"), RP2350 > 16777 ms; ESP32 refuses timeout <= 0. Only id 0 exists.
#     The supervisor enforces it: no feed within the timeout resets the board.
#   UART(id, baudrate, ..., rxbuf=, timeout=, timeout_char=): the wire is the
#     lab link (fd 0), paced by the supervisor at the line's baud rate. Bytes
#     arriving while interrupts are off (a flash erase/program, _hw.stall) only
#     have the 32-byte hardware FIFO: the rest is lost (overrun), as is
#     whatever arrives when the rxbuf ring is full. What the line brought before
#     the UART was constructed is dropped (nobody was receiving).
#   Pin(id, ...): a number with the arguments accepted (no GPIO here).
import io
import os
import select
import sys
import time
import _hw

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

EXIT_RESET = 3


def _chip():
    return _hw.params().get("chip", "rp2040")


def reset():
    _hw.note("R")
    sys.exit(EXIT_RESET)


def soft_reset():
    _hw.note("S")
    sys.exit(EXIT_RESET)


def reset_cause():
    return int(os.getenv("MTR_RESET_CAUSE") or PWRON_RESET)


def unique_id():
    return bytes.fromhex(_hw.params().get("unique_id", "e660000000000000"))


def freq(hz=None):
    if hz is not None:
        raise ValueError("the lab board runs at its calibrated speed")
    return int(_hw.params().get("cpu_hz", 125000000))


def idle():
    time.sleep_ms(1)


def disable_irq():
    return 1


def enable_irq(state=1):
    pass


class WDT:
    _armed = None  # one watchdog per chip

    def __init__(self, *, id=0, timeout=5000):
        if id != 0:
            raise ValueError("WDT(%d) doesn't exist" % id)
        limit = int(_hw.params().get("wdt_max_ms", 0))
        if limit and timeout > limit:
            raise ValueError("timeout exceeds %d" % limit)
        if timeout <= 0:
            raise ValueError("WDT timeout too short")
        self._timeout = timeout
        self._last = time.ticks_ms()
        _hw.note("W%d" % timeout)
        WDT._armed = self

    def feed(self):
        # The supervisor counts from the last note, so a feed left untold makes
        # the lab's watchdog stricter than the chip by up to the note spacing:
        # a sixteenth of the timeout (0.5 s of RP2040's 8 s; it was a quarter,
        # and a board fed 1.9 s after its last note then busy 6.5 s was reset),
        # without a line per receiver loop.
        now = time.ticks_ms()
        if time.ticks_diff(now, self._last) >= self._timeout // 16:
            self._last = now
            _hw.note("F")


class Pin:
    IN = 0
    OUT = 1
    OPEN_DRAIN = 2
    ALT = 3
    PULL_UP = 1
    PULL_DOWN = 2

    def __init__(self, id, *args, **kwargs):
        self.id = id
        self._v = 0

    def value(self, v=None):
        if v is None:
            return self._v
        self._v = 1 if v else 0

    def __call__(self, v=None):
        return self.value(v)


_FIFO = 32  # PL011 (RP2040) and ESP32 UART hardware RX FIFOs hold 32 bytes (ESP32: 128; the
            # lab uses hw.json "uart_fifo")


class UART(io.IOBase):
    def __init__(self, id=0, baudrate=9600, bits=8, parity=None, stop=1, *, tx=None, rx=None, txbuf=None,
                 rxbuf=None, timeout=None, timeout_char=None, invert=None, flow=None, rts=None, cts=None,
                 pins=None):
        p = _hw.params()
        ports = p.get("uart_ids", [0, 1])
        if id not in ports:
            raise ValueError("UART(%d) doesn't exist" % id)
        if rxbuf is not None and rxbuf < 32:
            rxbuf = 32  # the rp2 port's minimum
        self._rxbuf = rxbuf or 256
        self._fifo = int(p.get("uart_fifo", _FIFO))
        self._ring = bytearray()
        self._wire = sys.stdin.buffer
        self._chunk = bytearray(256)  # the wire is non-blocking (the supervisor's UART mode)
        self._stalled = False
        self.overruns = 0  # bytes lost
        self.baudrate = baudrate
        self._timeout = timeout or 0
        # Bytes the line brought before the UART was set up met no receiver: they are gone
        # (a host polling a board through its reset is not answered from a backlog).
        self.dropped_at_init = 0
        while True:
            try:
                k = self._wire.readinto(self._chunk)
            except OSError:
                k = None
            if not k:
                break
            self.dropped_at_init += k
        _hw.irq_hook(self)

    def init(self, *args, **kwargs):
        pass

    def deinit(self):
        pass

    # -- the ISR: wire -> FIFO -> ring ------------------------------------------
    def _take(self, limit):
        """Move up to `limit` arrived bytes off the wire; the rest of what has
        arrived is counted lost when limit runs out. Returns bytes moved."""
        n = 0
        buf = self._chunk
        mv = memoryview(buf)
        while True:
            try:
                k = self._wire.readinto(buf)
            except OSError:  # EAGAIN on some builds instead of None
                k = None
            if not k:
                break
            keep = min(k, limit - n) if limit > n else 0
            if keep:
                self._ring += bytes(mv[:keep])
                n += keep
            if k > keep:
                self.overruns += k - keep
        return n

    def _service(self):
        if not self._stalled:
            self._take(self._rxbuf - len(self._ring))

    def irq_off(self):
        self._service()  # the ISR kept up until now
        self._stalled = True

    def irq_on(self):
        # What arrived meanwhile: the FIFO kept its first bytes, the rest overran.
        self._stalled = False
        lost = self.overruns
        self._take(min(self._fifo, self._rxbuf - len(self._ring)))
        if self.overruns != lost:
            _hw.note("O%d" % (self.overruns - lost))

    # -- the port's API ------------------------------------------------------------
    def any(self):
        self._service()
        return len(self._ring)

    def read(self, nbytes=-1):
        self._service()
        if not self._ring:
            return None
        n = len(self._ring) if nbytes is None or nbytes < 0 else min(nbytes, len(self._ring))
        out = bytes(self._ring[:n])
        self._ring = self._ring[n:]
        return out

    def readinto(self, buf, nbytes=-1):
        self._service()
        if not self._ring:
            return None
        n = len(buf) if nbytes < 0 else min(nbytes, len(buf))
        n = min(n, len(self._ring))
        memoryview(buf)[:n] = self._ring[:n]
        self._ring = self._ring[n:]
        return n

    def readline(self):
        self._service()
        i = bytes(self._ring).find(b"\n")
        if i < 0:
            return None
        out = bytes(self._ring[:i + 1])
        self._ring = self._ring[i + 1:]
        return out

    def write(self, buf):
        return self._wire.write(buf)

    def flush(self):
        pass

    def txdone(self):
        return True

    def sendbreak(self):
        pass

    def irq(self, handler=None, trigger=0, hard=False):
        return None

    def ioctl(self, op, arg):
        if op == 3:  # MP_STREAM_POLL
            r = 0
            if arg & select.POLLIN and self.any():
                r |= select.POLLIN
            if arg & select.POLLOUT:
                r |= select.POLLOUT
            return r
        return 0
