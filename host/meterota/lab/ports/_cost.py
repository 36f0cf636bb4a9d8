# The lab's cost probe for the flash stand-ins (lab/mcu.py standin_costs): `n`
# reads (32 bytes, as littlefs reads) or page programs through rp2.Flash, or
# `n` calls of a native function of the same arity (what the boards' C
# readblocks costs the interpreter), timed by the lab in user CPU seconds.
import struct
import sys

import rp2

mode = sys.argv[1]
n = int(sys.argv[2])
f = rp2.Flash()
rbuf = bytearray(32)
pbuf = b"\xff" * 256  # programming 0xFF leaves the NOR as it is: repeatable
if mode == "read":
    for i in range(n):
        f.readblocks(i & 15, rbuf, 64)
elif mode == "program":
    for i in range(n):
        f.writeblocks(i & 15, pbuf, 256)
else:
    for i in range(n):
        struct.pack_into("<I", rbuf, 0, i & 15)
