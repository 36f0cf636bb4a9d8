# A small SMP client for the device: how a concentrator talks to its meters.
#
# One request at a time with a timeout and retries; while it waits it lets the
# receiver's pump serve the upstream host, so a concentrator busy with a meter
# still answers the head-end. UDP peers (Wi-Fi meters) and stream peers (a UART
# to a meter's optical/serial port) share the request logic.
from micropython import const
import struct
import socket
import time
import cbor
import framing

OP_READ = const(0)
OP_WRITE = const(2)


class PeerTimeout(Exception):
    pass


class PeerError(Exception):
    def __init__(self, group, rc):
        self.group = group
        self.rc = rc


class Peer:
    stream_like = False  # a byte stream the engine reads itself (take()), not the shared UDP socket

    def __init__(self, pump, frame_max):
        self.pump = pump
        self.frame_max = frame_max
        self.seq = 0
        self.got = None  # the reply frame being waited for

    def request(self, op, group, cmd, body, timeout_ms=2000, retries=2):
        for _ in range(retries + 1):
            seq = self.seq
            self.seq = (seq + 1) & 0xFF
            out = bytearray(8)
            cbor.dumps(body, out)
            struct.pack_into(">BBHHBB", out, 0, (1 << 3) | op, 0, len(out) - 8, group, seq, cmd)
            self._send(out)
            deadline = time.ticks_add(time.ticks_ms(), timeout_ms)
            while True:
                left = time.ticks_diff(deadline, time.ticks_ms())
                if left <= 0:
                    break
                frame = self._recv(left)
                if frame is None or len(frame) < 8:
                    continue
                b0, _f, ln, g, sq, c = struct.unpack_from(">BBHHBB", frame)
                if sq != seq or g != group or c != cmd or (b0 & 7) != op + 1 or ln != len(frame) - 8:
                    continue  # a late reply to an earlier try
                r = cbor.loads(memoryview(frame)[8:]) if ln else {}
                if not isinstance(r, dict):
                    raise PeerError(-1, 3)
                err = r.get("err")
                if isinstance(err, dict) and err.get("rc"):
                    raise PeerError(err.get("group", group), err["rc"])
                if r.get("rc"):
                    raise PeerError(-1, r["rc"])
                return r
        raise PeerTimeout()

    def _send(self, frame):  # pragma: no cover - each transport has its own
        raise NotImplementedError

    def _recv(self, ms):  # pragma: no cover - each transport has its own
        raise NotImplementedError

    def close(self):
        pass


_shared = None  # one UDP socket for every UDP meter: RAM and file descriptors stay flat


def udp_socket():
    global _shared
    if _shared is None:
        _shared = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _shared.setblocking(False)
    return _shared


class UDPPeer(Peer):
    def __init__(self, host, port, pump, frame_max):
        super().__init__(pump, frame_max)
        self.addr = socket.getaddrinfo(host, port)[0][-1]
        self.sock = udp_socket()

    def _send(self, frame):
        try:
            self.sock.sendto(frame, self.addr)
        except OSError:
            pass  # no route yet: like a lost datagram

    def _recv(self, ms):
        if not self.pump(min(ms, 50), self.sock):
            return None
        try:
            data, src = self.sock.recvfrom(self.frame_max + 8)
        except OSError:
            return None
        # The socket is shared: a late reply from another meter is not ours.
        return data if src == self.addr else None


class StreamPeer(Peer):
    """A meter on a byte stream (UART): console framing, as every SMP device takes."""

    def __init__(self, stream, pump, frame_max):
        super().__init__(pump, frame_max)
        self.stream = stream
        self.deframer = framing.Deframer(frame_max)
        self.rx = bytearray(256)
        self.frames = []

    def _send(self, frame):
        import link

        link.write_all(self.stream, framing.encode(frame, framing.CONSOLE, bytearray()))

    def _recv(self, ms):
        if not self.frames:
            if not self.pump(min(ms, 50), self.stream):
                return None
            n = self.stream.readinto(self.rx)
            if n:
                self.deframer.feed(memoryview(self.rx)[:n], self._frame)
        return self.frames.pop(0) if self.frames else None

    stream_like = True

    def take(self):
        """A frame that arrived, without waiting; None when there is none."""
        if not self.frames:
            n = self.stream.readinto(self.rx)
            if n:
                self.deframer.feed(memoryview(self.rx)[:n], self._frame)
        return self.frames.pop(0) if self.frames else None

    def _frame(self, f, kind):
        self.frames.append(bytes(f))


def open_peer(spec, pump, frame_max, board=None):
    """'udp:HOST:PORT' or a board-specific stream spec (the board opens it)."""
    kind, _, rest = spec.partition(":")
    if kind == "udp":
        host, _, port = rest.rpartition(":")
        return UDPPeer(host, int(port), pump, frame_max)
    if board is not None and hasattr(board, "open_stream"):
        return StreamPeer(board.open_stream(spec), pump, frame_max)
    raise ValueError("unsupported meter link " + spec)
