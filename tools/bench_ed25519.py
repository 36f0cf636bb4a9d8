"""Time device/ed25519.py verify() under MicroPython.

Locally:   .venv/bin/python tools/bench_ed25519.py   (re-runs itself under the
           venv's micropython with a 64 KiB heap and MICROPYPATH=device)
On a board: mpremote cp device/sha512.py device/ed25519.py : + run tools/bench_ed25519.py
"""

import sys

if sys.implementation.name != "micropython":
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    mpy = Path(sys.executable).parent / "micropython"
    env = dict(os.environ, MICROPYPATH=str(root / "device"))
    sys.exit(subprocess.call([str(mpy), "-X", "heapsize=64wK", __file__], env=env))

import gc
import time
from binascii import unhexlify

import ed25519

# RFC 8032 7.1 TEST 3.
PK = unhexlify("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025")
MSG = unhexlify("af82")
SIG = unhexlify(
    "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
    "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"
)
RUNS = 5

gc.collect()
before = gc.mem_alloc()
t = time.ticks_ms()
assert ed25519.verify(PK, MSG, SIG)
first = time.ticks_diff(time.ticks_ms(), t)
gc.collect()
kept = gc.mem_alloc() - before
times = []
for _ in range(RUNS):
    t = time.ticks_us()
    assert ed25519.verify(PK, MSG, SIG)
    times.append(time.ticks_diff(time.ticks_us(), t))
times.sort()
print("platform:", sys.platform)
print("first verify (builds B table): %d ms, table kept: %d bytes" % (first, kept))
print("verify: median %.2f ms, best %.2f ms over %d runs" % (times[RUNS // 2] / 1000, times[0] / 1000, RUNS))
gc.collect()
print("heap after:", gc.mem_alloc(), "used,", gc.mem_free(), "free")
