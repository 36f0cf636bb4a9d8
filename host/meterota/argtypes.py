"""Argument types for the command line: a value that would be accepted but mean
something wrong (a negative timeout, port 99999, an empty device id, a hash that
is not hex) is refused by argparse itself, one line and exit 2 (README "Exit
codes"), before anything is opened or contacted."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

BAUD_MAX = 2**31 - 1  # termios and pyserial take a C int
HASH_LEN = 32  # SHA-256, the MCUboot image hash TLV a device matches


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number of seconds") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{s!r}: must be a positive number of seconds")
    return v


def _int(s: str) -> int:
    try:
        return int(s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None


def count(s: str) -> int:
    """A number of retries or attempts: 0 or more."""
    v = _int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{s!r}: must be 0 or more")
    return v


def positive_int(s: str) -> int:
    v = _int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s!r}: must be 1 or more")
    return v


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    def check(s: str) -> int:
        v = _int(s)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{s!r}: must be from {lo} to {hi}")
        return v

    check.__name__ = f"int {lo}..{hi}"
    return check


def baud(s: str) -> int:
    v = _int(s)
    if not 1 <= v <= BAUD_MAX:
        raise argparse.ArgumentTypeError(f"{s!r} is not a baud rate (1 to {BAUD_MAX})")
    return v


def udp_address(s: str) -> str:
    """HOST[:PORT] (also udp:HOST[:PORT]); the port 1 to 65535. Kept as written:
    the transport parses it."""
    rest = s[len("udp:"):] if s.startswith("udp:") else s
    host, sep, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
    if not host:
        raise argparse.ArgumentTypeError(f"{s!r}: expected HOST[:PORT]")
    if sep:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"{s!r}: the port must be a number from 1 to 65535")
    return s


def device_id(s: str) -> str:
    if not s.strip() or s != s.strip() or any(ord(c) < 0x20 for c in s):
        raise argparse.ArgumentTypeError(f"{s!r} is not a device id (not empty, no surrounding blanks)")
    return s


def image_hash(s: str) -> bytes:
    try:
        h = bytes.fromhex(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a hex image hash") from None
    if len(h) != HASH_LEN:
        raise argparse.ArgumentTypeError(f"an image hash is {HASH_LEN} bytes ({2 * HASH_LEN} hex digits), "
                                         f"not {len(h)}")
    return h


def input_file(s: str) -> Path:
    """A file to read (a key): it must exist and be a file."""
    p = Path(s)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{s}: no such file")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{s}: is a directory")
    return p


def output_file(s: str) -> Path:
    """A file to write: its directory must exist, and it must not be a directory."""
    p = Path(s)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{s}: is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{s}: directory {parent} does not exist")
    return p


def state_dir(s: str) -> Path:
    """A directory to create or reuse: not an existing file."""
    p = Path(s)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{s}: not a directory")
    return p
