# Device-side profile for tools/bench.py: what the receiver's stages cost per
# MiB under MicroPython, measured on the same code the device runs (device/ and
# boards/unix). Runs only under MicroPython:
#   MICROPYPATH=boards/unix:device micropython -X heapsize=128wK tools/bench_device.py INPUT_DIR
# INPUT_DIR (written by tools/bench.py): image.bin (the image being uploaded),
# bin.frames / con.frames (its upload requests as the host frames them, binary and
# console framing), z.blocks (its raw-deflate blocks: u16 rlen, u16 zlen, data).
# Prints one JSON object: stage -> milliseconds per MiB of image data.
import sys
import time
import json
import gc
import hashlib
import deflate
import io
import struct
import framing
import cbor
import norflash

d = sys.argv[1]


def load(name):
    with open(d + "/" + name, "rb") as f:
        return f.read()


img = load("image.bin")
MIB = 1024 * 1024
out = {}


def per_mib(name, fn, nbytes):
    gc.collect()
    t = time.ticks_us()
    fn()
    dt = time.ticks_diff(time.ticks_us(), t)
    out[name] = round(dt / 1000 * MIB / nbytes, 2)


# CRC-16/XMODEM over 2048-byte frames: framing.crc16 as the device runs it (its native fast
# path where the port compiles viper code), and its pure-Python loop.
def crc():
    mv = memoryview(img)
    for i in range(0, len(img), 2048):
        framing.crc16(mv[i:i + 2048])


fast = getattr(framing, "_crc16_fast", None)
per_mib("crc16" + (" (native fast path)" if fast else " (Python loop)"), crc, len(img))
if fast is not None:
    framing._crc16_fast = None
    per_mib("crc16 (Python loop)", crc, len(img))
    framing._crc16_fast = fast


# The whole deframer (what link.StreamLink feeds), per framing, fed in 512-byte reads.
def feeder(blob):
    def run():
        n = [0]

        def on_frame(frame, kind):
            n[0] += 1

        dfr = framing.Deframer(2048)
        mv = memoryview(blob)
        for i in range(0, len(blob), 512):
            dfr.feed(mv[i:i + 512], on_frame)
        assert dfr.dropped == 0, dfr.dropped
    return run


per_mib("deframe binary (incl. crc16)", feeder(load("bin.frames")), len(img))
per_mib("deframe console (base64 + crc16)", feeder(load("con.frames")), len(img))


# CBOR decode of upload requests (data comes back as a memoryview: no copy).
def cb():
    blob = load("bin.frames")
    reqs = []

    def on_frame(frame, kind):
        reqs.append(bytes(frame[8:]))

    framing.Deframer(2048).feed(blob, on_frame)
    t = time.ticks_us()
    for r in reqs:
        cbor.loads(r)
    return time.ticks_diff(time.ticks_us(), t)


out["cbor decode"] = round(cb() / 1000 * MIB / len(img), 2)


# Both streaming SHA-256 hashes (MCUboot image hash and the file's `match` hash).
def sha():
    h1 = hashlib.sha256()
    h2 = hashlib.sha256()
    mv = memoryview(img)
    for i in range(0, len(img), 2048):
        h1.update(mv[i:i + 2048])
        h2.update(mv[i:i + 2048])
    h1.digest()
    h2.digest()


per_mib("sha256 x2", sha, len(img))


# Inflate of the raw-deflate blocks (window 2^9) into a 4 KiB buffer.
def infl():
    z = load("z.blocks")
    buf = bytearray(4096)
    pos = 0
    total = 0
    while pos < len(z):
        rlen, zlen = struct.unpack_from(">HH", z, pos)
        pos += 4
        n = deflate.DeflateIO(io.BytesIO(z[pos:pos + zlen]), deflate.RAW, 9).readinto(memoryview(buf)[:rlen])
        assert n == rlen
        pos += zlen
        total += n
    assert total == len(img)


per_mib("inflate (deflate blocks)", infl, len(img))


# The simulator's file-backed NOR: erase + program per 4 KiB sector (a real
# board's flash cost is its chip's, not this).
def flash():
    f = norflash.NorFlash(d + "/nor.bin", 1024 * 1024)
    buf = bytearray(4096)
    mv = memoryview(img)
    for s in range(len(img) // 4096):
        buf[:] = mv[s * 4096:(s + 1) * 4096]
        f.erase(s % 256)
        f.program((s % 256) * 4096, buf)


per_mib("flash erase+program (sim file)", flash, (len(img) // 4096) * 4096)
print(json.dumps(out))
