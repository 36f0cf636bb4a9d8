"""device/sha512.py and device/ed25519.py, run under the real MicroPython
unix interpreter with a 64 KiB (32-bit equivalent) heap.

The device modules are never imported into CPython: each test writes a small
script, runs it with `micropython`, and compares what it prints with answers
computed here (hashlib, RFC 8032 vectors, imgtool images, `cryptography`).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEVICE = REPO / "device"
MICROPYTHON = Path(sys.executable).parent / "micropython"
IMAGES = REPO.parent / "shared" / "vectors" / "images"

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P

pytestmark = pytest.mark.skipif(
    not MICROPYTHON.exists(), reason="micropython not installed in the venv"
)


def run_mpy(tmp_path, code, heap="64wK"):
    """Run `code` under MicroPython; return its stdout lines."""
    script = tmp_path / "script.py"
    script.write_text(code)
    env = dict(os.environ, MICROPYPATH=str(DEVICE))
    proc = subprocess.run(
        [str(MICROPYTHON), "-X", "heapsize=" + heap, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


# Runs a list of (public_key, message, signature) cases and prints the list of
# results as JSON; a case that raises prints the exception text instead, so a
# "never raises" violation shows up as a mismatch.
VERIFY_SCRIPT = """
import json
from binascii import unhexlify
import ed25519
cases = json.loads({cases!r})
out = []
for pk, msg, sig in cases:
    args = [unhexlify(x) if isinstance(x, str) else x for x in (pk, msg, sig)]
    try:
        out.append(ed25519.verify(*args))
    except Exception as e:
        out.append("raised %r" % e)
print(json.dumps(out))
"""


def verify_many(tmp_path, cases):
    """cases: list of (pk, msg, sig); bytes are sent as hex, anything else
    JSON-encodable (None, numbers) is passed as is."""
    enc = [[x.hex() if isinstance(x, (bytes, bytearray)) else x for x in c] for c in cases]
    lines = run_mpy(tmp_path, VERIFY_SCRIPT.format(cases=json.dumps(enc)))
    return json.loads(lines[-1])


def flip(data, bit):
    b = bytearray(data)
    b[bit >> 3] ^= 1 << (bit & 7)
    return bytes(b)


# --------------------------------------------------------------------- SHA-512

SHA_LENGTHS = [0, 1, 3, 55, 111, 112, 113, 127, 128, 129, 255, 256, 1000]


def _data(n):
    return bytes((i * 31 + 7) & 0xFF for i in range(n))


def test_sha512_matches_hashlib(tmp_path):
    code = """
from binascii import hexlify
from sha512 import sha512
def data(n):
    return bytes((i * 31 + 7) & 0xFF for i in range(n))
for n in %r:
    print(n, hexlify(sha512(data(n)).digest()).decode())
""" % (SHA_LENGTHS,)
    got = dict(line.split() for line in run_mpy(tmp_path, code))
    for n in SHA_LENGTHS:
        assert got[str(n)] == hashlib.sha512(_data(n)).hexdigest(), n


def test_sha512_incremental(tmp_path):
    # Chunkings that cross block boundaries at every offset class; digest()
    # in the middle must not disturb the running state.
    chunkings = [[1] * 300, [127, 1, 128, 44], [129, 255, 3], [0, 200, 0, 56], [64, 64, 64, 1000]]
    code = """
from binascii import hexlify
from sha512 import sha512
def data(n):
    return bytes((i * 31 + 7) & 0xFF for i in range(n))
for sizes in %r:
    d = data(sum(sizes))
    h = sha512()
    pos = 0
    for s in sizes:
        h.update(d[pos:pos + s])
        pos += s
        print("mid", hexlify(h.digest()).decode())
    print("end", hexlify(h.digest()).decode(), hexlify(h.digest()).decode())
h = sha512(bytearray(b"abc"))
h.update(memoryview(b"defgh")[1:4])
print("view", h.hexdigest())
""" % (chunkings,)
    lines = iter(run_mpy(tmp_path, code))
    for sizes in chunkings:
        d = _data(sum(sizes))
        pos = 0
        for s in sizes:
            pos += s
            assert next(lines) == "mid " + hashlib.sha512(d[:pos]).hexdigest()
        assert next(lines) == "end %s %s" % ((hashlib.sha512(d).hexdigest(),) * 2)
    assert next(lines) == "view " + hashlib.sha512(b"abcefg").hexdigest()


# --------------------------------------------------------- Ed25519: RFC 8032

# RFC 8032 section 7.1, TEST 1-3: (public key, message, signature).
RFC8032 = [
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]
RFC8032 = [tuple(bytes.fromhex(x) for x in v) for v in RFC8032]


def test_rfc8032_vectors(tmp_path):
    cases, expect = [], []
    for pk, msg, sig in RFC8032:
        cases.append((pk, msg, sig))
        expect.append(True)
        for bit in (0, 100, 255, 256, 300, 511):  # in R and in S
            cases.append((pk, msg, flip(sig, bit)))
            expect.append(False)
        for bit in (0, 77, 254):  # 255 is the sign bit of x
            cases.append((flip(pk, bit), msg, sig))
            expect.append(False)
        if msg:
            for bit in range(0, len(msg) * 8, 3):
                cases.append((pk, flip(msg, bit), sig))
                expect.append(False)
        cases.append((pk, msg + b"\x00", sig))
        expect.append(False)
    assert verify_many(tmp_path, cases) == expect


def test_non_canonical_s_rejected(tmp_path):
    cases = []
    for pk, msg, sig in RFC8032:
        s = int.from_bytes(sig[32:], "little")
        # S + L is congruent to S, so only the S < L check rejects it.
        cases.append((pk, msg, sig[:32] + (s + L).to_bytes(32, "little")))
        cases.append((pk, msg, sig[:32] + L.to_bytes(32, "little")))
        cases.append((pk, msg, sig[:32] + b"\xff" * 32))
    assert verify_many(tmp_path, cases) == [False] * len(cases)


def _undecodable_y():
    # A y for which (y^2 - 1) / (d y^2 + 1) has no square root mod p.
    y = 2
    while True:
        u = (y * y - 1) % P
        v = (D * y * y + 1) % P
        if pow(u * pow(v, P - 2, P) % P, (P - 1) // 2, P) == P - 1:
            return y
        y += 1


def test_malformed_input_returns_false(tmp_path):
    pk, msg, sig = RFC8032[1]
    bad_y = _undecodable_y().to_bytes(32, "little")
    cases = [
        (pk[:31], msg, sig),
        (pk + b"\x00", msg, sig),
        (pk, msg, sig[:63]),
        (pk, msg, sig + b"\x00"),
        (b"", b"", b""),
        (None, msg, sig),
        (pk, None, sig),
        (pk, msg, None),
        (pk, msg, 12345),
        (bad_y, msg, sig),  # key not on the curve
        (pk, msg, bad_y + sig[32:]),  # R not on the curve
        ((P + 1).to_bytes(32, "little"), msg, sig),  # non-canonical y >= p
        ((1 | 1 << 255).to_bytes(32, "little"), msg, sig),  # x = 0 with sign bit
        (pk, msg, (P + 1).to_bytes(32, "little") + sig[32:]),
    ]
    assert verify_many(tmp_path, cases) == [False] * len(cases)
    # Types other than bytes are fine as long as they are buffers.
    code = """
import ed25519
from binascii import unhexlify
pk, msg, sig = (unhexlify(x) for x in %r)
print(ed25519.verify(bytearray(pk), memoryview(msg), bytearray(sig)))
""" % ([pk.hex(), msg.hex(), sig.hex()],)
    assert run_mpy(tmp_path, code) == ["True"]


def test_random_signatures_against_cryptography(tmp_path):
    ed = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
    from cryptography.hazmat.primitives import serialization

    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    cases, expect = [], []
    for i in range(12):
        key = ed.Ed25519PrivateKey.generate()
        pk = key.public_key().public_bytes(*raw)
        msg = os.urandom(32 if i % 2 else i * 13)
        sig = key.sign(msg)
        cases.append((pk, msg, sig))
        expect.append(True)
        cases.append((pk, msg, flip(sig, 8 * i + 3)))
        expect.append(False)
        s = int.from_bytes(sig[32:], "little")
        cases.append((pk, msg, sig[:32] + (s + L).to_bytes(32, "little")))
        expect.append(False)
    assert verify_many(tmp_path, cases) == expect


def test_internals(tmp_path):
    # Curve constants, the addition chain, wNAF recoding and the double-scalar
    # multiplication on its own ([L]B must be the neutral element).
    code = """
import ed25519 as e
p = e._P
assert e._D * 121666 % p == -121665 % p
assert e._D2 == 2 * e._D % p
assert e._SQRTM1 * e._SQRTM1 % p == p - 1
x, y = e._BX, e._BY
assert (y * y - x * x - 1 - e._D * x * x * y * y) % p == 0
assert y * 5 % p == 4 and x & 1 == 0
for z in (1, 2, 19, p - 1, 2**255 - 20, 3**150 % p):
    assert z * e._inv(z) % p == 1
for w in (4, 5, 6):
    for n in (0, 1, 2, 15, 16, 17, 2**252, e._L - 1, 2**253 - 1, 3**159):
        digits = e._wnaf(n, w)
        total = 0
        last = -w
        for i in range(255, -1, -1):
            d = digits[i]
            if d >= 128:
                d -= 256
            if d:
                assert d & 1 and -(1 << w - 1) < d < (1 << w - 1)
            total = 2 * total + d
        for i in range(256):
            if digits[i]:
                assert i - last >= w  # non-adjacency
                last = i
        assert total == n, (w, n)
X, Y, Z = e._double_scalar(e._L, 0, e._BX, e._BY)
assert X % p == 0 and (Y - Z) % p == 0 and Z % p
X, Y, Z = e._double_scalar(1, e._L - 1, e._BX, e._BY)
assert X % p == 0 and (Y - Z) % p == 0
print("ok")
"""
    assert run_mpy(tmp_path, code) == ["ok"]


# ------------------------------------------------------- imgtool MCUboot images


def _load_images():
    meta = json.loads((IMAGES / "images.json").read_text())
    pk = bytes.fromhex(meta["test_public_key_raw_hex"])
    out = {}
    for im in meta["images"]:
        tlv = {int(t["type"], 16): t for t in im["tlvs"]}
        if 0x24 not in tlv:
            continue
        blob = (IMAGES / im["file"]).read_bytes()
        vals = {}
        for typ in (0x10, 0x24):
            t = tlv[typ]
            value = bytes.fromhex(t["value_hex"])
            # The JSON offset is the TLV header; the value follows it.
            assert blob[t["offset"] + 4 : t["offset"] + 4 + t["len"]] == value
            vals[typ] = value
        actual = bytes.fromhex(im["sha256_over_header_payload_protected_tlvs"])
        out[im["file"]] = (vals[0x10], vals[0x24], actual)
    return pk, out


@pytest.mark.skipif(not (IMAGES / "images.json").exists(), reason="no shared image vectors")
def test_imgtool_images(tmp_path):
    pk, images = _load_images()
    expect = {
        "app-1.0.0-signed.bin": True,
        "app-1.2.3-signed.bin": True,
        "app-1.2.3-otherkey.bin": False,
    }
    assert set(expect) <= set(images)
    names = sorted(images)
    cases = [(pk, images[n][0], images[n][1]) for n in names]
    # What the bootloader really checks: the recomputed digest.  It differs
    # from the stored TLV only for the tampered image.
    cases += [(pk, images[n][2], images[n][1]) for n in names]
    got = verify_many(tmp_path, cases)
    tlv_res = dict(zip(names, got[: len(names)]))
    actual_res = dict(zip(names, got[len(names) :]))
    for name, ok in expect.items():
        assert tlv_res[name] is ok, name
        assert actual_res[name] is ok, name
    if "app-1.2.3-tampered.bin" in images:
        assert tlv_res["app-1.2.3-tampered.bin"] is True  # signature itself intact
        assert actual_res["app-1.2.3-tampered.bin"] is False
    if "app-2.0.0-seccnt5.bin" in images:
        assert actual_res["app-2.0.0-seccnt5.bin"] is True


# ------------------------------------------------------------------ timing


@pytest.mark.skipif(not (IMAGES / "images.json").exists(), reason="no shared image vectors")
def test_verify_time(tmp_path, capsys):
    """Measures (does not assert) verify time and heap use under micropython."""
    pk, images = _load_images()
    msg, sig, _ = images["app-1.2.3-signed.bin"]
    code = """
import gc, time
from binascii import unhexlify
import ed25519
pk, msg, sig = (unhexlify(x) for x in %r)
gc.collect()
base = gc.mem_alloc()
t = time.ticks_us()
ok = ed25519.verify(pk, msg, sig)
first = time.ticks_diff(time.ticks_us(), t)
gc.collect()
kept = gc.mem_alloc() - base
runs = []
for _ in range(10):
    t = time.ticks_us()
    ok = ed25519.verify(pk, msg, sig) and ok
    runs.append(time.ticks_diff(time.ticks_us(), t))
runs.sort()
print(ok, first, runs[len(runs) // 2], kept)
""" % ([pk.hex(), msg.hex(), sig.hex()],)
    ok, first, median, kept = run_mpy(tmp_path, code)[-1].split()
    assert ok == "True"
    with capsys.disabled():
        print(
            "\n[ed25519] micropython unix verify: %.2f ms (median of 10), first call "
            "%.2f ms (builds the B table, kept: %s bytes)"
            % (int(median) / 1000, int(first) / 1000, kept)
        )
