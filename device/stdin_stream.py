# USB CDC (or the REPL UART) stdin as a stream the receiver can poll, shared by
# the esp32 and rp2 boards. stdin's own readinto blocks until the buffer is
# full; this one moves the bytes that are there and returns None when none are.
import io
import sys


class StdinStream(io.IOBase):
    """USB CDC stdin as a non-blocking stream: readinto moves bytes one at a
    time while poll says one is ready (stdin's own readinto blocks until the
    buffer is full) and returns None, never 0, when none is there."""

    def __init__(self):
        import select

        self.inp = sys.stdin.buffer
        self.out = sys.stdout.buffer
        self.p = select.poll()
        self.p.register(sys.stdin, select.POLLIN)
        self.one = memoryview(bytearray(1))
        self.POLLIN = select.POLLIN
        self.POLLOUT = select.POLLOUT

    def _ready(self):
        for _o, ev in self.p.ipoll(0):
            if ev & self.POLLIN:
                return True
        return False

    def readinto(self, buf, n=-1):
        n = len(buf) if n < 0 else min(n, len(buf))
        mv = memoryview(buf)
        i = 0
        one = self.one
        while i < n and self._ready():
            if not self.inp.readinto(one):
                break
            mv[i] = one[0]
            i += 1
        return i if i else None

    def write(self, buf):
        return self.out.write(buf)

    def ioctl(self, op, arg):
        if op == 3:  # MP_STREAM_POLL
            r = 0
            if arg & self.POLLIN and self._ready():
                r |= self.POLLIN
            if arg & self.POLLOUT:
                r |= self.POLLOUT
            return r
        return 0
