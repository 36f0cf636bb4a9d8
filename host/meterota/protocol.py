"""SMP protocol models, apart from any I/O: the header, bodies, framings, codes.

Facts come from Zephyr's SMP documentation and are checked against the shared
test vectors (../shared/vectors/smp.json) that the device tests check too.
"""

from __future__ import annotations

import base64
import binascii
import enum
import struct
from dataclasses import dataclass
from typing import Any, Callable

import cbor2

HEADER = struct.Struct(">BBHHBB")
CONSOLE_LINE_RAW = 90  # 120 base64 characters: 123-byte lines, as smp cuts them (see the vectors)


class Op(enum.IntEnum):
    READ = 0
    READ_RSP = 1
    WRITE = 2
    WRITE_RSP = 3


class Group(enum.IntEnum):
    OS = 0
    IMAGE = 1
    METEROTA = 64


# Upload `image` numbers (smpmgr --slot N; MCUboot serial recovery numbering):
# 0-2 image 0, the application bundle; 3-4 image 1, a board's native firmware
# (ESP32 OTA partitions; device/grp_image.py APP_IMAGES / FIRMWARE_IMAGES).
FIRMWARE_IMAGE = 1  # "image" of its entries in the state read
FIRMWARE_UPLOAD_IMAGE = 3


class Framing(enum.Enum):
    CONSOLE = "console"  # Zephyr's base64 lines: what every SMP tool speaks
    BINARY = "binary"  # meterota's: 06 0B, u16 len, u8 check, frame, CRC-16


MGMT_ERR = {
    0: "OK", 1: "unknown error", 2: "out of memory", 3: "invalid argument", 4: "timeout",
    5: "no such entry", 6: "bad state", 7: "message too large", 8: "not supported",
    9: "corrupt", 10: "busy (another upload is in progress)", 11: "access denied",
    12: "protocol too old", 13: "protocol too new",
}
IMG_ERR = {
    1: "unknown image error", 3: "no image", 4: "image has no TLVs", 8: "hash not found",
    9: "no free slot (the other slot is in use: running, pending or the fallback)",
    12: "flash write failed", 13: "flash erase failed", 14: "invalid slot",
    20: "invalid offset", 21: "invalid length", 22: "invalid image header",
    23: "bad image magic: not an MCUboot image", 24: "image hash mismatch",
    27: "the running version is newer (downgrade refused)", 28: "an image is already pending",
    30: "image too large for the slot", 31: "data past the declared image length",
    32: "image refused (signature or policy)", 33: "cannot test the running image",
}
METEROTA_ERR = {2: "no confirmation record yet"}
GROUP_ERR: dict[int, dict[int, str]] = {1: IMG_ERR, 64: METEROTA_ERR}


@dataclass(frozen=True)
class Header:
    op: int
    version: int
    flags: int
    length: int
    group: int
    seq: int
    cmd: int

    def pack(self) -> bytes:
        return HEADER.pack((self.version << 3) | self.op, self.flags, self.length, self.group, self.seq, self.cmd)

    @classmethod
    def unpack(cls, frame: bytes) -> "Header":
        b0, flags, length, group, seq, cmd = HEADER.unpack_from(frame)
        return cls(b0 & 7, (b0 >> 3) & 3, flags, length, group, seq, cmd)


def encode_request(op: Op, group: int, cmd: int, seq: int, body: dict[str, Any], version: int = 1) -> bytes:
    payload = cbor2.dumps(body, canonical=True)
    return Header(int(op), version, 0, len(payload), group, seq, cmd).pack() + payload


def decode_frame(frame: bytes) -> tuple[Header, Any]:
    h = Header.unpack(frame)
    if len(frame) != 8 + h.length:
        raise ValueError(f"SMP length {h.length} but frame carries {len(frame) - 8} bytes")
    body = cbor2.loads(frame[8:]) if h.length else {}
    return h, body


def error_of(group: int, body: Any) -> tuple[int, int, str] | None:
    """(group, rc, text) when `body` is an error reply (v1 rc or v2 err), else None."""
    if not isinstance(body, dict):
        return (group, 3, "malformed reply")
    err = body.get("err")
    if isinstance(err, dict) and err.get("rc", 0):
        g, rc = int(err.get("group", group)), int(err["rc"])
        return g, rc, GROUP_ERR.get(g, {}).get(rc, f"group {g} error {rc}")
    rc = body.get("rc", 0)
    if rc:
        return -1, int(rc), MGMT_ERR.get(int(rc), f"error {rc}") + (f" ({body['rsn']})" if "rsn" in body else "")
    return None


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM: binascii.crc_hqx with initial value 0."""
    return binascii.crc_hqx(data, 0)


def encode_console(frame: bytes, line_raw: int = CONSOLE_LINE_RAW) -> bytes:
    """The console framing; `line_raw` raw bytes per line (other tools cut differently)."""
    pkt = struct.pack(">H", len(frame) + 2) + frame + struct.pack(">H", crc16(frame))
    out = bytearray()
    for i in range(0, len(pkt), line_raw):
        out += b"\x06\x09" if i == 0 else b"\x04\x14"
        out += base64.b64encode(pkt[i:i + line_raw]) + b"\n"
    return bytes(out)


def encode_binary(frame: bytes) -> bytes:
    n = len(frame)
    return bytes([0x06, 0x0B, n >> 8, n & 0xFF, (~((n >> 8) + (n & 0xFF))) & 0xFF]) + frame + struct.pack(">H", crc16(frame))


def encode(frame: bytes, framing: Framing) -> bytes:
    return encode_binary(frame) if framing is Framing.BINARY else encode_console(frame)


class StreamDecoder:
    """Host-side receiver for both framings; bytes outside frames (device log,
    REPL output) are kept in `noise` for -v traces."""

    def __init__(self, on_frame: Callable[[bytes], None], max_frame: int = 65535):
        self.on_frame = on_frame
        self.max_frame = max_frame
        self.buf = bytearray()
        self.pkt = bytearray()
        self.in_packet = False
        self.noise = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self._step():
            pass

    def resync(self) -> None:
        """The line went quiet inside a frame, so that frame was cut: drop its first
        byte and look for frames in what came after it (a cut frame claiming a long
        body would otherwise swallow the short replies that follow)."""
        if self.buf:
            self.noise += self.buf[:1]
            del self.buf[:1]
            self.in_packet = False
            while self._step():
                pass

    def _step(self) -> bool:
        b = self.buf
        if not b:
            return False
        starts = [i for i in (b.find(b"\x06"), b.find(b"\x04") if self.in_packet else -1) if i >= 0]
        if not starts:
            self.noise += b
            b.clear()
            return False
        p = min(starts)
        if p:
            self.noise += b[:p]
            del b[:p]
        if len(b) < 2:
            return False
        if b[0] == 0x06 and b[1] == 0x0B:
            if len(b) < 5 + 8:
                return False  # wait for the SMP header too: it must agree with our length
            n = (b[2] << 8) | b[3]
            if (b[4] != (~(b[2] + b[3])) & 0xFF or n < 8 or n > self.max_frame
                    or ((b[7] << 8) | b[8]) != n - 8):
                self.noise += b[:1]
                del b[:1]
                return True
            if len(b) < 5 + n + 2:
                return False
            body = bytes(b[5:5 + n + 2])
            self.in_packet = False
            if crc16(body) != 0:
                self.noise += b[:1]
                del b[:1]  # not a frame after all (or a cut one): frames may start inside it
                return True
            del b[:5 + n + 2]
            self.on_frame(body[:-2])
            return True
        first = b[0] == 0x06 and b[1] == 0x09
        cont = b[0] == 0x04 and b[1] == 0x14 and self.in_packet
        if not (first or cont):
            self.noise += b[:1]
            del b[:1]
            return True
        e = b.find(b"\n")
        if e < 0:
            return False
        line = bytes(b[2:e])
        del b[:e + 1]
        if first:
            self.pkt = bytearray()
            self.in_packet = True
        try:
            self.pkt += base64.b64decode(line)
        except (binascii.Error, ValueError):
            self.in_packet = False
            return True
        if len(self.pkt) >= 2:
            total = (self.pkt[0] << 8) | self.pkt[1]
            if len(self.pkt) >= total + 2:
                self.in_packet = False
                if len(self.pkt) == total + 2 and crc16(bytes(self.pkt[2:])) == 0:
                    self.on_frame(bytes(self.pkt[2:total]))
        return True
