"""Host protocol code against the same shared vectors the device tests use."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from meterota import protocol as P


def _unplain(x: Any) -> Any:
    if isinstance(x, dict):
        if list(x) == ["bytes_hex"]:
            return bytes.fromhex(x["bytes_hex"])
        return {k: _unplain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unplain(v) for v in x]
    return x


def test_crc_check_value(vectors: dict[str, Any]) -> None:
    c = vectors["crc16_xmodem_check"]
    assert P.crc16(c["input_ascii"].encode()) == int(c["crc"], 16)


def test_requests_encode_byte_exact(vectors: dict[str, Any]) -> None:
    for v in vectors["requests"]:
        h = v["header"]
        frame = P.encode_request(P.Op(h["op"]), h["group"], h["cmd"], h["seq"], _unplain(v["body"]), h["version"])
        assert frame.hex() == v["frame_hex"], v["name"]
        lines = P.encode_console(frame)
        assert lines == b"".join(bytes.fromhex(x) for x in v["serial_lines_hex"]), v["name"]


def test_stream_decoder_reads_every_vector_through_noise(vectors: dict[str, Any]) -> None:
    got: list[bytes] = []
    dec = P.StreamDecoder(got.append)
    want = []
    for v in vectors["requests"] + vectors["responses"]:
        wire = b"MicroPython v1.29 REPL noise\r\n" + b"".join(bytes.fromhex(x) for x in v["serial_lines_hex"])
        for i in range(0, len(wire), 5):
            dec.feed(wire[i:i + 5])
        want.append(bytes.fromhex(v["frame_hex"]))
    assert got == want


def test_binary_framing_round_trip_and_resync() -> None:
    got: list[bytes] = []
    dec = P.StreamDecoder(got.append)
    frame = P.encode_request(P.Op.WRITE, 1, 1, 3, {"off": 0, "data": bytes(range(256)) * 8})
    good = P.encode_binary(frame)
    bad = bytearray(good)
    bad[100] ^= 0x40  # a corrupted copy is dropped by its CRC
    dec.feed(b"\x06\x0b\xff\xff\x00junk" + bytes(bad) + good)
    assert got == [frame]


@pytest.mark.parametrize("body,expect", [
    ({"rc": 8}, (-1, 8)),
    ({"err": {"group": 1, "rc": 24}}, (1, 24)),
    ({"off": 5}, None),
    ({"rc": 0}, None),
])
def test_error_forms(body: dict[str, Any], expect: tuple[int, int] | None) -> None:
    e = P.error_of(1, body)
    assert (e[:2] if e else None) == expect


def test_reply_vectors_decode(vectors: dict[str, Any]) -> None:
    for v in vectors["responses"]:
        h, body = P.decode_frame(bytes.fromhex(v["frame_hex"]))
        assert h.op in (1, 3)
        assert body == _unplain(v["body"]), v["name"]
        assert cbor2.loads(bytes.fromhex(v["frame_hex"])[8:]) == body
