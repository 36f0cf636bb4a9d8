"""Per-request times of a plain image upload on a simulated board, as smpmgr sends it (128-byte
chunks, one request at a time, no retries): what a fixed client timeout must allow.

    python tools/request_times.py rp2 1.0      # BOARD SPEED; prints boot, median, total, slowest

The slowest requests are the ones that complete a sector whose write makes littlefs compact a
slot directory's metadata (the Pico on stock firmware keeps its slots as littlefs files, 8 to a
subdirectory: boards/rp2/README.md). README's smpmgr
section and tests/conftest.py SMPMGR_BOARD_TIMEOUT quote these figures."""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

from meterota import image as img
from meterota import protocol as P
from meterota.boards import slot_size
from meterota.client import SMPClient
from meterota.lab.sim import SimDevice
from meterota.transport import from_address

CHUNK = 128  # smpmgr's chunk with its default line buffers (161-byte frames)


def main(board: str, speed: float) -> None:
    with tempfile.TemporaryDirectory(prefix="mtr-reqtimes-") as d:
        dev = SimDevice(Path(d) / "board", device_id="reqtimes", board=board, speed=speed,
                        extra={"grace_ms": 0, "allow_downgrade": True})
        t0 = time.monotonic()
        dev.start(timeout=600)
        print(f"boot to ready {time.monotonic() - t0:.1f} s", flush=True)
        try:
            t = from_address(port=dev.address)
            t.open()
            c = SMPClient(t, timeout=30.0)
            c.connect()
            data = img.build_image(None, "1.1.0", slot_size=slot_size(board), board=board)
            c.image_erase(1)
            sha = hashlib.sha256(data).digest()
            times: list[tuple[float, int]] = []
            off = 0
            while off < len(data):
                body: dict[str, object] = {"off": off, "data": data[off:off + CHUNK]}
                if off == 0:
                    body.update(len=len(data), sha=sha, image=0)
                a, sent = time.monotonic(), off
                off = int(c.request(P.Op.WRITE, P.Group.IMAGE, 1, body, retries=0)["off"])
                times.append((time.monotonic() - a, sent))
            t.close()
        finally:
            dev.stop()
    times.sort(reverse=True)
    print(f"{len(times)} requests, total {sum(x for x, _ in times):.1f} s, median {times[len(times) // 2][0]:.3f} s")
    print("slowest (s at offset):", ", ".join(f"{x:.2f} at {o}" for x, o in times[:8]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "rp2", float(sys.argv[2]) if len(sys.argv) > 2 else 1.0)
