"""Device framing, CBOR and SMP dispatch under MicroPython, checked against the
shared vectors (../shared/vectors/smp.json) that the host tests check too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cbor2

from conftest import VECTORS, run_mp

# Runs on the device: decode every vector's serial lines, re-encode every frame,
# round-trip every body through our CBOR, and print one JSON line per vector.
VECTOR_SCRIPT = r"""
import json, binascii
import framing, cbor
v = json.load(open(%r))

def plain(x):
    # CBOR-decoded value -> JSON-able, bytes as {"bytes_hex": ...} like the vectors
    if isinstance(x, memoryview) or isinstance(x, bytes):
        return {"bytes_hex": binascii.hexlify(bytes(x)).decode()}
    if isinstance(x, dict):
        return {k: plain(x[k]) for k in x}
    if isinstance(x, list):
        return [plain(i) for i in x]
    return x

def unplain(x):
    if isinstance(x, dict):
        if list(x.keys()) == ["bytes_hex"]:
            return binascii.unhexlify(x["bytes_hex"])
        return {k: unplain(x[k]) for k in x}
    if isinstance(x, list):
        return [unplain(i) for i in x]
    return x

crc = framing.crc16(v["crc16_xmodem_check"]["input_ascii"].encode())
print(json.dumps({"crc": crc}))
for kind in ("requests", "responses"):
    for r in v[kind]:
        frame = binascii.unhexlify(r["frame_hex"])
        got = []
        d = framing.Deframer(2048)
        wire = b"".join(binascii.unhexlify(l) for l in r["serial_lines_hex"])
        # Feed in 7-byte pieces with noise in front, to exercise resynchronisation.
        wire = b"\x00garbage\r\n" + wire
        for i in range(0, len(wire), 7):
            d.feed(memoryview(wire[i:i + 7]), lambda f, k: got.append(bytes(f)))
        enc = framing.encode(frame, framing.CONSOLE, bytearray())
        body = cbor.loads(frame[8:])
        reenc = bytes(cbor.dumps(unplain(r["body"])))
        print(json.dumps({"name": r["name"], "kind": kind, "deframed": got == [frame],
                          "encoded": bytes(enc) == wire[10:],
                          "body": plain(body) == r["body"],
                          "reencoded_hex": binascii.hexlify(reenc).decode()}))
"""


def test_device_framing_and_cbor_match_the_vectors(tmp_path: Path, vectors: dict[str, Any]) -> None:
    out = run_mp(tmp_path, VECTOR_SCRIPT % str(VECTORS / "smp.json")).stdout.splitlines()
    rows = [json.loads(x) for x in out]
    assert rows[0]["crc"] == int(vectors["crc16_xmodem_check"]["crc"], 16)
    by_name = {r["name"]: r for r in rows[1:]}
    all_vectors = vectors["requests"] + vectors["responses"]
    assert set(by_name) == {v["name"] for v in all_vectors}
    for v in all_vectors:
        r = by_name[v["name"]]
        assert r["deframed"], v["name"]
        assert r["encoded"], v["name"]
        assert r["body"], v["name"]
        # Our encoder is canonical (as smp's); it must decode to the same body.
        frame = bytes.fromhex(v["frame_hex"])
        assert cbor2.loads(bytes.fromhex(r["reencoded_hex"])) == cbor2.loads(frame[8:]), v["name"]
        if v["name"] in ("os echo", "image upload: first chunk", "os mcumgr params reply", "os echo reply"):
            assert r["reencoded_hex"] == frame[8:].hex(), v["name"]


def _state_dir(tmp_path: Path) -> Path:
    from meterota.boards import provision_unix, unix_config_extra

    d = tmp_path / "dev"
    d.mkdir()
    cfg = {"id": "meter-t", "key": "11" * 32, "serial": None, "udp": None, **unix_config_extra()}
    (d / "config.json").write_text(json.dumps(cfg))
    provision_unix(d)
    return d


# Feeds vector request frames (and malformed ones) to the real dispatcher of a
# device built on the unix board's NOR flash; prints each reply frame in hex.
DISPATCH_SCRIPT = r"""
import sys, json, binascii
import board, receiver
b = board.Board(%r)
import updater
updater.Updater(b).select_boot()
ctx, disp = receiver.build(b)
reqs = json.loads(%r)
for h in reqs:
    r = disp.handle(binascii.unhexlify(h))
    print("none" if r is None else binascii.hexlify(r).decode())
"""


def _dispatch(tmp_path: Path, frames: list[bytes]) -> list[bytes | None]:
    d = _state_dir(tmp_path)
    code = DISPATCH_SCRIPT % (str(d), json.dumps([f.hex() for f in frames]))
    out = run_mp(tmp_path, code).stdout.splitlines()
    return [None if x == "none" else bytes.fromhex(x) for x in out]


def test_dispatch_answers_the_vector_requests_like_zephyr(tmp_path: Path, vectors: dict[str, Any]) -> None:
    reqs = {v["name"]: bytes.fromhex(v["frame_hex"]) for v in vectors["requests"]}
    resps = {v["name"]: bytes.fromhex(v["frame_hex"]) for v in vectors["responses"]}
    names = ["os echo", "os mcumgr params", "os reset", "image state read", "os application info"]
    got = dict(zip(names, _dispatch(tmp_path, [reqs[n] for n in names])))
    # Byte-exact where our reply carries the same values as the vector's.
    assert got["os echo"] == resps["os echo reply"]
    assert got["os mcumgr params"] == resps["os mcumgr params reply"]
    assert got["os reset"] == resps["os reset reply"]
    st = got["image state read"]
    assert st is not None and st[:2] == bytes([0x09, 0x00]) and st[4:8] == reqs["image state read"][4:8]
    body = cbor2.loads(st[8:])
    assert set(body) == {"images", "splitStatus"}
    (slot0,) = body["images"]
    assert slot0["slot"] == 0 and slot0["active"] and slot0["confirmed"] and slot0["version"] == "1.0.0"
    assert set(slot0) == {"slot", "version", "hash", "bootable", "active", "confirmed"}
    info = got["os application info"]
    assert info is not None and cbor2.loads(info[8:])["output"] == "MicroPython"


def _req(op: int, group: int, cmd: int, body: bytes, ver: int = 1, seq: int = 7, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return bytes([(ver << 3) | op, 0, n >> 8, n & 0xFF, group >> 8, group & 0xFF, seq, cmd]) + body


def test_dispatch_errors_never_crash(tmp_path: Path) -> None:
    frames = [
        _req(0, 0, 99, b"\xa0"),  # unknown command -> ENOTSUP
        _req(0, 77, 0, b"\xa0"),  # unknown group -> ENOTSUP
        _req(2, 0, 0, b"\xa1\x61d"),  # truncated CBOR -> EINVAL
        _req(2, 0, 0, b"\x83\x01\x02\x03"),  # body not a map -> EINVAL
        _req(2, 0, 0, cbor2.dumps({"d": 5})),  # wrong type -> EINVAL
        _req(0, 0, 6, b"\xa0", ver=2),  # version too new -> rc 13
        _req(1, 0, 0, b"\xa0"),  # a response: never answered
        b"\x08\x00",  # shorter than a header: ignored
        _req(0, 0, 6, b"\xa0", length=5),  # length disagrees with the frame -> EINVAL
        _req(2, 1, 0, cbor2.dumps({"hash": b"\x00" * 31, "confirm": False})),  # v2 image error: err map
        _req(2, 1, 0, cbor2.dumps({"hash": b"\x00" * 31, "confirm": False}), ver=0),  # same in v1: rc
        _req(2, 1, 1, cbor2.dumps({"off": 0, "data": b"\x00" * 40, "len": 40})),  # bad magic -> 23
        _req(0, 64, 1, b"\xa0"),  # no confirmation record yet -> user group error
        _req(0, 0, 6, b"\xa0"),  # and a valid request still works
    ]
    out = _dispatch(tmp_path, frames)
    bodies = [None if o is None else cbor2.loads(o[8:]) for o in out]
    assert bodies[0] == {"rc": 8}
    assert bodies[1] == {"rc": 8}
    assert bodies[2] == {"rc": 3}
    assert bodies[3] == {"rc": 3}
    assert bodies[4] == {"rc": 3}
    assert bodies[5] == {"rc": 13}
    assert out[6] is None and out[7] is None
    assert bodies[8] == {"rc": 3}
    assert bodies[9] == {"err": {"group": 1, "rc": 24}}
    assert bodies[10] == {"rc": 3}
    assert bodies[11] == {"err": {"group": 1, "rc": 23}}
    assert bodies[12] == {"err": {"group": 64, "rc": 2}}
    assert bodies[13] == {"buf_size": 2048, "buf_count": 4}
    for o, f in zip(out, frames):
        if o is not None:
            assert o[6] == f[6] and o[7] == f[7] and o[0] & 7 == (f[0] & 7) + 1


# A binary frame that lost bytes on the line (a UART overrun mid-body) must not
# take the frame after it down too: the deframer scans again from the next
# start marker inside the body it wrongly took.
RESYNC_SCRIPT = r"""
import json
import framing

def req(seq, n):
    body = bytes([0x40 + (seq + i) % 64 for i in range(n)])
    return bytes([2, 0, n >> 8, n & 255, 0, 1, seq, 1]) + body

a, b, c = req(1, 300), req(2, 40), req(3, 200)
wa = bytes(framing.encode(a, framing.BINARY, bytearray()))
wb = bytes(framing.encode(b, framing.BINARY, bytearray()))
wc = bytes(framing.encode(c, framing.BINARY, bytearray()))
out = []
for piece in (1, 7, 64, 1024):
    for cut in (20, 200):
        wire = wa[:100] + wa[100 + cut:] + wb + wc  # `cut` bytes of a's body lost
        d = framing.Deframer(2048)
        got = []
        for i in range(0, len(wire), piece):
            d.feed(memoryview(wire[i:i + piece]), lambda f, k: got.append(bytes(f)))
        out.append({"piece": piece, "cut": cut, "b": b in got, "c": c in got, "a": a in got})
print(json.dumps(out))
"""


def test_a_binary_frame_cut_mid_body_does_not_take_the_next_frame(tmp_path: Path) -> None:
    rows = json.loads(run_mp(tmp_path, RESYNC_SCRIPT).stdout.splitlines()[-1])
    for r in rows:
        assert not r["a"], r  # the cut frame itself is lost (its CRC)
        assert r["b"] and r["c"], r  # the frames after it are not
