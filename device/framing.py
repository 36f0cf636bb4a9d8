# Serial framings for SMP.
#
# console: the standard "SMP over console" framing of Zephyr/smpclient. A packet is
#   u16 total_len | SMP frame | u16 CRC-16/XMODEM(frame), base64-encoded and cut
#   into lines: 06 09 <b64> \n for the first line, 04 14 <b64> \n after.
# binary: our faster framing, offered to hosts that ask for it (user group):
#   06 0B | u16 len | u8 ~(len_hi + len_lo) | SMP frame | u16 CRC-16/XMODEM(frame).
#   It starts with 0x06 like a console packet, so one receiver serves both and a
#   reply always goes out in the framing of its request.
# Anything else on the line (noise, a REPL banner, a cut frame) is dropped.
from micropython import const
import binascii

CONSOLE = const(1)
BINARY = const(2)

_SOF = const(0x06)
_SOF_CONSOLE = const(0x09)
_SOF_BINARY = const(0x0B)
_CONT0 = const(0x04)
_CONT1 = const(0x14)
_NL = const(0x0A)
_BIN_HDR = const(5)  # 06 0B, u16 length, check byte
_LINE_RAW = const(90)  # raw bytes per line: 120 base64 chars, 123-byte lines as smp cuts them

_IDLE = const(0)
_PKT = const(1)  # console packet started, waiting for the next line
_BIN = const(2)  # binary frame body in progress


def _make_table():
    import array

    t = []
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) if c & 0x8000 else (c << 1)
        t.append(c & 0xFFFF)
    return array.array("H", t)  # 512 bytes of heap, half what a tuple takes on a 32-bit port


_TABLE = _make_table()
_BUFS = (bytes, bytearray, memoryview)
_crc16_fast = None


def crc16(buf, crc=0):
    """CRC-16/XMODEM (poly 0x1021, init 0, no reflection)."""
    if _crc16_fast is not None and isinstance(buf, _BUFS) and type(crc) is int and 0 <= crc <= 0xFFFF:
        return _crc16_fast(buf, crc, _TABLE)
    t = _TABLE
    for b in buf:
        crc = ((crc << 8) & 0xFF00) ^ t[(crc >> 8) ^ b]
    return crc


def _native_crc16():
    # The same loop as machine code (device/crc16n.py), checked against the loop above.
    try:
        from crc16n import crc16 as f
    except (ImportError, ValueError, SyntaxError):  # a .mpy for another CPU, or no native emitter
        return None
    probe = b"123456789"
    if f(probe, 0, _TABLE) != 0x31C3 or f(memoryview(probe)[3:], 0xA5A5, _TABLE) != crc16(probe[3:], 0xA5A5):
        return None
    return f


_crc16_fast = _native_crc16()


class Deframer:
    """Turns a byte stream into SMP frames; feed() calls on_frame(frame_mv, kind)."""

    def __init__(self, frame_max, line_max=512):
        self.frame_max = frame_max
        self.pkt = bytearray(frame_max + 4)
        self.pmv = memoryview(self.pkt)
        self.rx = bytearray(line_max)
        self.rmv = memoryview(self.rx)
        self.rlen = 0
        self.state = _IDLE
        self.plen = 0
        self.need = 0
        self.dropped = 0  # bytes or packets discarded, for diagnostics

    def reset(self):
        """Forget any partial packet (called when the line goes idle)."""
        if self.state != _IDLE:
            self.dropped += 1
        self.state = _IDLE
        self.rlen = 0

    def feed(self, data, on_frame):
        n = len(data)
        i = 0
        while True:
            if self.state == _BIN:
                # Body bytes go straight into the packet buffer, first those
                # already held in rx, then the new data.
                if self.rlen:
                    k = min(self.need, self.rlen)
                    self.pmv[self.plen:self.plen + k] = self.rmv[:k]
                    self._consume(k)
                elif i < n:
                    k = min(self.need, n - i)
                    self.pmv[self.plen:self.plen + k] = data[i:i + k]
                    i += k
                else:
                    return
                self.plen += k
                self.need -= k
                if self.need == 0:
                    self._bin_done(on_frame)
                    self._scan(on_frame)
                continue
            if i >= n:
                return
            room = len(self.rx) - self.rlen
            if room == 0:
                # A line longer than any we accept: drop what we hold.
                self.dropped += self.rlen
                self.rlen = 0
                self.state = _IDLE
                room = len(self.rx)
            k = min(room, n - i)
            self.rmv[self.rlen:self.rlen + k] = data[i:i + k]
            self.rlen += k
            i += k
            self._scan(on_frame)

    def _consume(self, k):
        rest = self.rlen - k
        if rest > 0:
            self.rmv[:rest] = self.rmv[k:self.rlen]
        self.rlen = rest

    def _scan(self, on_frame):
        rx = self.rx
        while self.rlen and self.state != _BIN:
            # Find the start of the next marker (0x06 or, inside a packet, 0x04).
            p = rx.find(b"\x06", 0, self.rlen)
            if self.state == _PKT:
                q = rx.find(b"\x04", 0, self.rlen)
                if q >= 0 and (p < 0 or q < p):
                    p = q
            if p < 0:
                self.dropped += self.rlen
                self.rlen = 0
                return
            if p:
                self.dropped += p
                self._consume(p)
            if self.rlen < 2:
                return
            m0 = rx[0]
            m1 = rx[1]
            if m0 == _SOF and m1 == _SOF_BINARY:
                if self.rlen < _BIN_HDR + 8:
                    return  # a real frame has at least its SMP header after ours
                ln = (rx[2] << 8) | rx[3]
                # Noise that looks like our header must not swallow the line:
                # the check byte, the size limit and the SMP header's own body
                # length must all agree before we commit to a frame.
                if (rx[4] != (~(rx[2] + rx[3])) & 0xFF or ln < 8 or ln > self.frame_max
                        or ((rx[7] << 8) | rx[8]) != ln - 8):
                    self._consume(1)
                    self.dropped += 1
                    continue
                self.state = _BIN
                self.plen = 0
                self.need = ln + 2
                self._consume(_BIN_HDR)
                return
            first = m0 == _SOF and m1 == _SOF_CONSOLE
            cont = m0 == _CONT0 and m1 == _CONT1 and self.state == _PKT
            if not (first or cont):
                self._consume(1)
                self.dropped += 1
                continue
            e = rx.find(b"\n", 2, self.rlen)
            if e < 0:
                return  # wait for the rest of the line
            self._line(self.rmv[2:e], first, on_frame)
            self._consume(e + 1)

    def _line(self, text, first, on_frame):
        if first:
            self.state = _PKT
            self.plen = 0
        try:
            raw = binascii.a2b_base64(text)
        except ValueError:
            self.state = _IDLE
            self.dropped += 1
            return
        k = len(raw)
        if self.plen + k > len(self.pkt):
            self.state = _IDLE
            self.dropped += 1
            return
        self.pmv[self.plen:self.plen + k] = raw
        self.plen += k
        if self.plen < 2:
            return
        total = (self.pkt[0] << 8) | self.pkt[1]
        if total < 10 or total > self.frame_max + 2:
            self.state = _IDLE
            self.dropped += 1
            return
        if self.plen < total + 2:
            return
        self.state = _IDLE
        if self.plen != total + 2 or crc16(self.pmv[2:total + 2]) != 0:
            self.dropped += 1
            return
        on_frame(self.pmv[2:total], CONSOLE)

    def _bin_done(self, on_frame):
        self.state = _IDLE
        n = self.plen - 2
        if crc16(self.pmv[:self.plen]) != 0:
            self.dropped += 1
            self._resync()
            return
        on_frame(self.pmv[:n], BINARY)

    def _resync(self):
        # A frame that lost bytes on the line (a UART overrun) took the next
        # frame's first bytes as its body: scan them again from the next
        # start marker in that body, ahead of what rx still holds. Rare, so a
        # copy of rx's bytes is allowed here.
        p = self.pkt.find(b"\x06", 1, self.plen)
        if p < 0:
            return
        k = self.plen - p
        if k + self.rlen > len(self.rx):
            return  # more than rx holds: lost like the frame itself
        held = bytes(self.rmv[:self.rlen])
        self.rmv[:k] = self.pmv[p:self.plen]
        self.rmv[k:k + len(held)] = held
        self.rlen = k + len(held)


def encode(frame, kind, out):
    """Append `frame` framed as `kind` to bytearray `out`."""
    n = len(frame)
    crc = crc16(frame)
    if kind == BINARY:
        out.append(_SOF)
        out.append(_SOF_BINARY)
        out.append(n >> 8)
        out.append(n & 0xFF)
        out.append((~((n >> 8) + (n & 0xFF))) & 0xFF)
        out.extend(frame)
        out.append(crc >> 8)
        out.append(crc & 0xFF)
        return out
    pkt = bytearray(n + 4)
    total = n + 2
    pkt[0] = total >> 8
    pkt[1] = total & 0xFF
    pkt[2:2 + n] = frame
    pkt[n + 2] = crc >> 8
    pkt[n + 3] = crc & 0xFF
    mv = memoryview(pkt)
    for i in range(0, n + 4, _LINE_RAW):
        if i == 0:
            out.append(_SOF)
            out.append(_SOF_CONSOLE)
        else:
            out.append(_CONT0)
            out.append(_CONT1)
        out.extend(binascii.b2a_base64(mv[i:i + _LINE_RAW], newline=False))
        out.append(_NL)
    return out
