"""Whether to compress an upload, from rates rather than from the link type.

Deflate saves link time and costs CPU time: the host compresses each block,
the board inflates it. Both sides work while the link carries the previous
requests, but on a link faster than that work the upload waits on the CPU
(the unpaced pty: 1.5 MB/s compressed against 2.9 MB/s raw on this host).
So, per raw byte of the image:

    compress  iff  (1 - ratio) / link  >  MARGIN * (1 / inflate + 1 / host_deflate)

link: what the link carries (bytes/s): a UART's baud / 10 when the port is one,
otherwise measured with echo round trips (SMPClient.link_rate); inflate: the
board's inflate rate (raw bytes/s out of the inflater), as the device reports it
once it has inflated something, else the figure measured for its board in the
simulated boards (BOARD_INFLATE_BPS, tools/bench.py); host_deflate and ratio:
measured by the host itself preparing compressed requests for a sample of the
image (SMPClient.choose_compression).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Raw bytes/s out of the board's inflater (device/grp_image.py upload_deflated,
# window 2^9, blocks of up to 4 KiB of an application bundle), as the device counts it
# (stats inflate_bytes / inflate_us) in `python tools/bench_boards.py --quick esp32 rp2`
# on the simulated boards of this machine, 2026-12-02 (load under 1): the Pico stand-in
# 0.18 MB/s over USB CDC (0.09 over its UART), the ESP32 stand-in 0.06 MB/s (0.05);
# unix 20-24 MB/s (the host CPU, `python tools/bench.py --boards-only`). The throttle
# slows the C inflater like Python code, and a loaded host more, so these are lower
# bounds. They are only the prior for images under PROBE_MIN: larger uploads time
# both ways. A real board's own count (info inflate_bps) replaces them once it has
# inflated something.
BOARD_INFLATE_BPS = {
    "unix": 20_000_000,
    "rp2": 180_000,
    "esp32": 60_000,
}
UNKNOWN_BOARD_INFLATE_BPS = min(BOARD_INFLATE_BPS.values())  # a board we have no figure for: the slowest

# Serial ports that are a UART at the set baud (USB-serial bridges, SoC UARTs); a
# USB CDC port (ttyACM, usbmodem) or a pty runs at whatever the two ends manage.
_UART_PORT = re.compile(r"(ttyUSB|ttyS|ttyAMA|ttyTHS|cu\.usbserial|cu\.SLAB|cu\.wchusbserial|COM)\d*", re.I)


def uart_rate(port: str, baudrate: int) -> float | None:
    """Bytes/s of an 8N1 UART when `port` is one (baud / 10), else None."""
    return baudrate / 10 if _UART_PORT.search(port.rsplit("/", 1)[-1]) else None


@dataclass
class Sample:
    ratio: float  # bytes on the link / raw bytes, over the sample
    host_bps: float  # raw bytes/s the host prepares compressed requests at (compress, size checks)


# The model leaves out per-block costs on both sides (request objects, the device's
# inflater set-up, garbage): on the unpaced pty compressing cost about 3x what the
# inflate and host figures predict. Compress only where it clearly wins.
MARGIN = 2.0

# For an image of PROBE_MIN or more the upload itself decides (client._Probe): a raw
# stretch and a deflate stretch of PROBE_BYTES each are timed, the rest goes the faster
# way, deflate only when PROBE_MARGIN x faster. Smaller images use choose() above with the
# link's rate: a UART's baud / 10 as the prior, else echoes.
PROBE_BYTES = 16384
PROBE_MIN = 4 * PROBE_BYTES
PROBE_MARGIN = 1.1


def stretch_rate(acks: list[tuple[float, int]]) -> float | None:
    """Raw bytes/s of a pipelined stretch from its replies (time, raw bytes acknowledged):
    the bytes after the first reply over the time from the first reply to the last."""
    if len(acks) < 2:
        return None
    dt = acks[-1][0] - acks[0][0]
    n = sum(b for _t, b in acks[1:])
    return n / dt if dt > 0 else float("inf")


@dataclass
class Choice:
    compress: bool
    link_bps: float  # inf: faster than the probe resolves
    inflate_bps: float
    host_bps: float
    ratio: float
    why: str


def choose(link_bps: float, inflate_bps: float, sample: Sample) -> Choice:
    """The rule above, with its figures (for logs and UploadStats)."""
    saved = (1.0 - sample.ratio) / link_bps if link_bps > 0 else float("inf")
    cost = 1.0 / inflate_bps + 1.0 / sample.host_bps
    yes = saved > MARGIN * cost
    why = (f"link {_fmt(link_bps)}, board inflates {_fmt(inflate_bps)}, host deflates {_fmt(sample.host_bps)}, "
           f"ratio {sample.ratio:.2f}: compressing {'saves' if yes else 'costs'} "
           f"{abs(saved - cost) * 1e6:.2f} s/MB")
    return Choice(yes, link_bps, inflate_bps, sample.host_bps, sample.ratio, why)


def _fmt(bps: float) -> str:
    if bps == float("inf"):
        return "unmeasurably fast"
    return f"{bps / 1000:.0f} kB/s" if bps < 10_000_000 else f"{bps / 1e6:.0f} MB/s"


def link_rate_from_echoes(small: list[float], big: list[float], small_bytes: int, big_bytes: int) -> float:
    """Link rate (bytes/s) from echo round-trip times (s) of two payload sizes:
    the extra time of the bigger payload, there and back, best case of each. The
    fixed cost (latency, request handling) cancels; inf when the difference is
    below what the clock and scheduling resolve (0.2 ms)."""
    extra = min(big) - min(small)
    if extra <= 0.0002:
        return float("inf")
    return 2 * (big_bytes - small_bytes) / extra
