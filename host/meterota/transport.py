"""Transports: move SMP frames to a device and back, nothing more.

SerialTransport takes a device path or any pyserial URL (socket://host:port,
rfc2217://host:port, ...); UDPTransport speaks SMP over UDP (port 1337).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from typing import Deque

import serial

from .errors import TransportError
from .protocol import Framing, StreamDecoder, encode

log = logging.getLogger("meterota.transport")

UDP_PORT = 1337
UDP_MAX = 1472  # one IPv4 datagram on a 1500-byte MTU, as smpclient assumes


class Transport:
    """A frame-level link. max_frame: the largest SMP message it can carry."""

    max_frame: int = 65535
    name: str = "?"

    def line_time(self, nbytes: int) -> float:
        """Seconds the link needs to carry an SMP message of `nbytes` one way, framing included
        (0 where the link's rate is not the limit, as on UDP)."""
        return 0.0

    def open(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def send(self, frame: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def recv(self, timeout: float) -> bytes | None:  # pragma: no cover - interface
        """The next SMP frame, or None when `timeout` seconds pass first."""
        raise NotImplementedError

    def drain(self) -> None:
        """Forget frames that arrived late (after a timeout)."""
        while self.recv(0.0) is not None:
            pass

    def __enter__(self) -> "Transport":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialTransport(Transport):
    def __init__(self, port: str, baudrate: int = 115200, framing: Framing = Framing.CONSOLE):
        self.port = port
        self.baudrate = baudrate
        self.framing = framing
        self.name = port
        self._ser: serial.SerialBase | None = None
        self._frames: Deque[bytes] = collections.deque()
        self._dec = StreamDecoder(self._frames.append)

    @property
    def max_frame(self) -> int:  # type: ignore[override]
        return 65535

    def line_time(self, nbytes: int) -> float:
        # 10 bits a byte at the port's baud rate (a USB CDC port ignores it: then this is only an
        # upper bound). The console framing base64-encodes and adds a header line per 127 bytes.
        wire = nbytes * 4 // 3 + 8 * (1 + nbytes // 93) if self.framing is Framing.CONSOLE else nbytes + 8
        return wire * 10 / max(1, self.baudrate)

    def open(self) -> None:
        try:
            self._ser = serial.serial_for_url(self.port, baudrate=self.baudrate, timeout=0, do_not_open=True)
            self._ser.dtr = True  # USB CDC devices drop output while DTR is low
            self._ser.open()
        except (serial.SerialException, OSError, ValueError) as e:
            raise TransportError(f"cannot open serial port {self.port}: {_reason(e)}") from None

    def close(self) -> None:
        if self._ser is not None:
            try:
                self._ser.close()
            except (serial.SerialException, OSError):
                pass
            self._ser = None

    def send(self, frame: bytes) -> None:
        assert self._ser is not None
        try:
            self._ser.write(encode(frame, self.framing))
        except (serial.SerialException, OSError) as e:
            raise TransportError(f"serial write to {self.port} failed: {_reason(e)}") from None

    def recv(self, timeout: float) -> bytes | None:
        assert self._ser is not None
        deadline = time.monotonic() + timeout
        while not self._frames:
            left = deadline - time.monotonic()
            if left <= 0 and timeout > 0:
                return None
            try:
                # Block for one byte (or the time left), then take what is there.
                self._ser.timeout = max(0.0, min(left, 0.5))
                data = self._ser.read(1)
                if data:
                    data += self._ser.read(self._ser.in_waiting)
            except (serial.SerialException, OSError) as e:
                raise TransportError(f"serial read from {self.port} failed: {_reason(e)}") from None
            if data:
                self._dec.feed(data)
                if self._dec.noise:
                    log.debug("device output: %r", bytes(self._dec.noise))
                    self._dec.noise.clear()
            elif timeout == 0:
                return None
        return self._frames.popleft()


class UDPTransport(Transport):
    def __init__(self, host: str, port: int = UDP_PORT, mtu: int = 1500):
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"
        self.max_frame = mtu - 28
        self._sock: socket.socket | None = None
        self._addr: tuple[str, int] | None = None

    def open(self) -> None:
        try:
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
        except socket.gaierror as e:
            raise TransportError(f"cannot resolve {self.host}: {e.strerror}") from None
        self._sock = socket.socket(info[0], socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._addr = info[4][:2]
        self._sock.connect(self._addr)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, frame: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.send(frame)
        except OSError as e:
            raise TransportError(f"UDP send to {self.name} failed: {_reason(e)}") from None

    def recv(self, timeout: float) -> bytes | None:
        assert self._sock is not None
        self._sock.settimeout(timeout if timeout > 0 else 0.0)
        try:
            return self._sock.recv(65535)
        except (socket.timeout, BlockingIOError):
            return None
        except ConnectionRefusedError:
            # ICMP port unreachable: nothing listens (yet) - like silence.
            return None
        except OSError as e:
            raise TransportError(f"UDP receive from {self.name} failed: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    s = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return s.split("\n")[0]


def from_address(port: str | None = None, udp: str | None = None, baudrate: int = 115200) -> Transport:
    """Build the transport for `--port PORT` or `--udp HOST[:PORT]`."""
    if udp:
        if udp.startswith("udp:"):
            udp = udp[len("udp:"):]
        host, _, p = udp.rpartition(":") if udp.count(":") == 1 else (udp, "", "")
        if p and not p.isdigit():
            raise TransportError(f"--udp expects HOST[:PORT], got {udp!r}")
        return UDPTransport(host or udp, int(p) if p else UDP_PORT)
    if port:
        if port.startswith("serial:"):
            port = port[len("serial:"):]
        elif port.startswith("udp:"):
            return from_address(udp=port[len("udp:"):])
        return SerialTransport(port, baudrate)
    raise TransportError("no device given: use --port PORT or --udp HOST[:PORT]")


def canonical_address(address: str) -> str:
    """One spelling per target, so one device named two ways is one target:
    `serial:` + the real path of a device node (`/dev/pts/2`, `serial:/dev/pts/2`
    and `/dev/../dev/pts/2` are one port; pyserial URLs stay as written), and
    `udp:` + the resolved address + the port (`udp:localhost` is
    `udp:127.0.0.1:1337`)."""
    a = address.strip()
    if a.startswith("udp:"):
        rest = a[len("udp:"):]
        host, _, p = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
        host = (host or rest).strip("[]")
        port = int(p) if p.isdigit() else UDP_PORT
        try:
            host = str(socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0])
        except (socket.gaierror, UnicodeError):
            host = host.lower()
        return f"udp:{host}:{port}"
    if a.startswith("serial:"):
        a = a[len("serial:"):]
    if "://" in a:
        return a
    return "serial:" + os.path.realpath(a)
