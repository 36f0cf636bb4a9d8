"""Links for tools/bench.py that meterota.lab.sim does not provide itself.

* ReplLink -- the unix MicroPython REPL on pty A, bridged to pty B for mpremote
  (reference micropython.md 4.6: one pty does not work, two bridged ptys with
  `resume` do), paced exactly like SimDevice's serial bridge: the same
  meterota.lab.sim pacing class, so mpremote and the SMP tools see the same UART.
* CountingShaper -- a meterota.lab.sim.LinkShaper that counts the bytes each way, so
  the benchmark can report what a tool really put on the wire.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "host"))

from meterota.lab.sim import LinkShaper, _Direction  # noqa: E402  (the simulator's own UART pacing)


class CountingShaper(LinkShaper):
    """Passes bytes unchanged and counts them (called from the bridge thread only)."""

    def __init__(self) -> None:
        self.to_dev = 0
        self.to_hst = 0

    def to_device(self, data: bytes) -> bytes:
        self.to_dev += len(data)
        return data

    def to_host(self, data: bytes) -> bytes:
        self.to_hst += len(data)
        return data

    def snapshot(self) -> tuple[int, int]:
        return self.to_dev, self.to_hst


class ReplLink:
    """micropython (REPL) <-> pty A <-bridge (paced)-> pty B <-> mpremote."""

    def __init__(self, workdir: Path, micropython: Path, bytes_per_second: float | None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ma, sa = pty.openpty()
        self.mb, self.sb = pty.openpty()
        # Raw before micropython starts: no ONLCR, mpremote must see the raw-REPL banner as sent.
        tty.setraw(sa)
        tty.setraw(self.sb)
        self.path = os.ttyname(self.sb)
        self.proc = subprocess.Popen([str(micropython)], stdin=sa, stdout=sa, stderr=sa, cwd=self.workdir,
                                     start_new_session=True, close_fds=True)
        os.close(sa)
        for fd in (self.ma, self.mb):
            os.set_blocking(fd, False)
        self.to_dev = _Direction(bytes_per_second)   # pty B (host) -> pty A (REPL)
        self.to_host = _Direction(bytes_per_second)  # pty A -> pty B
        self.bytes_to_dev = 0
        self.bytes_to_host = 0
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="bench-repl-bridge", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(2)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        for fd in (self.ma, self.mb, self.sb, self._wake_r, self._wake_w):
            os.close(fd)

    def __enter__(self) -> "ReplLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop:
            now = time.monotonic()
            self.to_dev.advance(now)
            self.to_host.advance(now)
            self._flush(self.to_dev, self.ma)
            self._flush(self.to_host, self.mb)
            rd = [self._wake_r]
            if self.to_dev.has_room():
                rd.append(self.mb)
            if self.to_host.has_room():
                rd.append(self.ma)
            wr = [fd for d, fd in ((self.to_dev, self.ma), (self.to_host, self.mb)) if d.outbox]
            dl = [d for d in (self.to_dev.deadline(), self.to_host.deadline()) if d is not None]
            timeout = max(0.0, min(dl) - time.monotonic()) if dl else None
            r, _, _ = select.select(rd, wr, [], timeout)
            for fd in r:
                if fd == self._wake_r:
                    os.read(fd, 64)
                    continue
                try:
                    data = os.read(fd, 4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:  # EIO: the REPL process went away
                    return
                if fd == self.mb:
                    self.bytes_to_dev += len(data)
                    self.to_dev.push(data)
                else:
                    self.bytes_to_host += len(data)
                    self.to_host.push(data)

    @staticmethod
    def _flush(d: _Direction, fd: int) -> None:
        if not d.outbox:
            return
        try:
            n = os.write(fd, d.outbox)
        except (BlockingIOError, InterruptedError):
            return
        del d.outbox[:n]
