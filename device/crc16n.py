# CRC-16/XMODEM as machine code (@micropython.viper), for device/framing.py: ~20x
# its Python loop, and the CRC was more than half of the receiver's CPU time per
# MiB (tools/bench.py). Compiled ahead by mpy-cross -march for the board's CPU
# (meterota.image.MPY_ARCH); framing falls back to its loop when this module does
# not load (a .mpy built for another CPU, a port without a native emitter).
import micropython


@micropython.viper
def crc16(buf, crc: int, table) -> int:
    p = ptr8(buf)
    t = ptr16(table)
    for i in range(int(len(buf))):
        crc = ((crc << 8) & 0xFF00) ^ t[(crc >> 8) ^ p[i]]
    return crc
