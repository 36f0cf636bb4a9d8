"""Host-side simulator supervisor.

Runs the MicroPython device program (boards/unix/main.py) as child processes and gives each
simulated device an address that standard tools can use:

* ``serial:/dev/pts/N`` -- a pty whose master side is bridged to a TCP connection that the
  device opens to the supervisor (the unix port has no UART, so TCP stands in for the wire);
  a simulated MCU board on USB CDC answers at ``serial:STATE_DIR/tty`` instead, a stable name
  (like /dev/serial/by-id/...) for a port that vanishes while the board resets (see UsbCdc);
* ``udp:127.0.0.K:1337`` -- a loopback address the device binds itself (smpmgr only speaks to
  port 1337, so each device needs its own loopback IP).

A device that exits asking for a reset (3), that hits a simulated power failure (86) or that
crashes (anything else: a watchdog reset on a real board) is restarted with the same state
directory, hence the same flash.bin. The pty path of the unix board and the UDP address survive
restarts, so a client can keep its port open across a device reset, as with a real UART or Wi-Fi
board; a USB CDC port does not (a client reopens it, as on a real board).
"""

from __future__ import annotations

import argparse
import collections
import errno
import fcntl
import json
import tempfile
import os
import re
import secrets
import selectors
import signal
import socket
import select
import struct
import subprocess
import sys
import termios
import threading
import time
import tty
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Literal

from . import mcu as _mcu

__all__ = [
    "EXIT_CLEAN",
    "EXIT_RESET",
    "EXIT_POWERFAIL",
    "MAX_CRASHES",
    "LinkShaper",
    "SimError",
    "SimDevice",
    "SimCluster",
    "add_sim_arguments",
    "run_sim_cli",
    "main",
]

Transport = Literal["serial", "udp"]

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MAIN = REPO_ROOT / "boards" / "unix" / "main.py"
DEFAULT_HEAP = "128wK"
READY_LINE = b"meterota: ready"
UDP_PORT = 1337

EXIT_CLEAN = 0
EXIT_RESET = 3
EXIT_POWERFAIL = 86
# A real board's watchdog would reset forever; we give up so a broken image fails fast.
MAX_CRASHES = 5

# Bytes buffered per bridge direction before we stop reading the source: back-pressure instead
# of unbounded memory when one side is not reading.
_HIGH_WATER = 64 * 1024
# Pacing granularity: each "transmission" slice covers at most this much line time, so small
# frames are not delayed behind a large one and the schedule stays smooth.
_PACE_SLICE_S = 0.005
# How much wake-up lateness a busy paced line may make up for (see _Direction.advance).
# Same grammar as boards/unix/norflash.py parses: N[:before|torn[:seed]].
_POWERFAIL_RE = re.compile(r"^[1-9]\d*(:(before|torn)(:-?\d+)?)?$")

# Loopback addresses handed out by this process; the bind probe cannot see an address that
# was assigned but whose device has not bound it yet.
_udp_claims: set[str] = set()
_udp_claims_lock = threading.Lock()


class SimError(RuntimeError):
    """A simulated device failed to start, died, or did not become ready in time."""


class LinkShaper:
    """Hook for link impairments on the serial bridge; the default passes bytes unchanged.

    Subclass and override. Each method gets one chunk as read from its source and returns the
    bytes to forward (possibly fewer, more or altered; b"" drops the chunk). Called from the
    bridge thread only.
    """

    def to_device(self, data: bytes) -> bytes:
        return data

    def to_host(self, data: bytes) -> bytes:
        return data


# --------------------------------------------------------------------------------------------
# Serial bridge


class _Direction:
    """One direction of the bridge: shaped bytes waiting, optionally paced like a UART line.

    With pacing, bytes move inbox -> in-flight slice -> outbox. A byte goes on the wire no
    earlier than it was written and no earlier than the byte before it finished, as on a real
    UART: bytes already waiting continue where the last slice ended (so a bridge thread that
    wakes late costs nothing and the average rate is exact), but idle line time is lost (a
    stop-and-wait client does not get its turnaround back).
    """

    def __init__(self, bytes_per_second: float | None) -> None:
        self.bps = bytes_per_second
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.flight = b""
        self.flight_due = 0.0
        self.line_free_at = 0.0
        self.chunks: collections.deque[list[float]] = collections.deque()  # [bytes left, written at]

    def push(self, data: bytes) -> None:
        if self.bps is None:
            self.outbox += data
        elif data:
            self.inbox += data
            self.chunks.append([len(data), time.monotonic()])

    def advance(self, now: float) -> None:
        if self.bps is None:
            return
        if self.flight and now >= self.flight_due:
            self.outbox += self.flight
            self.flight = b""
            self.line_free_at = self.flight_due
        if not self.flight and self.inbox:
            n = min(len(self.inbox), max(1, int(self.bps * _PACE_SLICE_S)))
            written_at = self.chunks[0][1] if self.chunks else now
            k = n
            while k and self.chunks:
                c = self.chunks[0]
                take = min(k, int(c[0]))
                c[0] -= take
                k -= take
                if c[0] <= 0:
                    self.chunks.popleft()
            self.flight = bytes(self.inbox[:n])
            del self.inbox[:n]
            self.flight_due = max(self.line_free_at, written_at) + n / self.bps

    def deadline(self) -> float | None:
        return self.flight_due if self.flight else None

    def has_room(self) -> bool:
        return len(self.inbox) + len(self.flight) + len(self.outbox) < _HIGH_WATER

    def clear(self) -> None:
        self.inbox.clear()
        self.outbox.clear()
        self.flight = b""
        self.line_free_at = 0.0
        self.chunks.clear()


@dataclass(frozen=True)
class UsbCdc:
    """What the bridge models of a MicroPython board's USB CDC console (TinyUSB at full speed,
    shared/tinyusb/mp_usbd_cdc.c):

    * the port exists only while the board runs: it vanishes when the board resets (the host's
      open port reads EOF and writes fail with EIO) and comes back, under a new pty, when the
      firmware's USB is up again; the stable name is the symlink `on_port` maintains;
    * flow control: the board takes `rx_bytes` (its stdin ring plus the CDC RX FIFO) ahead of
      what it has read; beyond that the host is NAKed (retried every 1 ms USB frame) and its
      writes queue in the host's own buffer (the pty's 20 KiB stands for cdc-acm's 16 URBs);
    * DTR is "a host has the port open" (a pty has no modem lines; pyserial and cdc-acm raise
      DTR on open and drop it on close): while it is low the board's writes go into the
      `tx_fifo`-byte TX FIFO, which keeps the newest bytes and drops the older ones; 16 SOFs
      (`dtr_flush`) after DTR rises, the FIFO goes to the host;
    * with DTR high, a write the host does not read gives up after `tx_timeout` without
      progress and the rest is lost (MICROPY_HW_USB_CDC_TX_TIMEOUT)."""

    rx_bytes: int
    tx_fifo: int = 256
    tx_timeout: float = 0.5
    dtr_flush: float = 0.016
    frame: float = 0.001  # a NAKed OUT transfer is retried in the next frame
    dtr_poll: float = 0.01  # how often the bridge looks for a host opening the port


class BoardClock:
    """The time a simulated board's watchdog counts: wall time less what its process spent
    runnable but waiting for a host CPU (/proc/PID/schedstat's run-queue delay). A chip's time
    never waits for another program; on a loaded host the throttled board would otherwise run
    slower than the chip for the same wall time and its watchdog be stricter than the chip's.
    Time the throttle holds the process stopped is the board's own pace and still counts. Where
    /proc has no schedstat, plain wall time."""

    def __init__(self, pid: int) -> None:
        self.path = f"/proc/{pid}/schedstat"
        self._waited = 0.0

    def waited(self) -> float:
        """Seconds the process has waited on a run queue since it started; once it has exited,
        the last figure read (so that its clock does not jump ahead)."""
        try:
            with open(self.path) as f:
                self._waited = int(f.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
        return self._waited

    def now(self) -> float:
        return time.monotonic() - self.waited()


def _is_counts(text: str) -> bool:
    a, sep, b = text.partition(",")
    return bool(sep) and a.isdigit() and b.isdigit()


def _fionread(fd: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


class _SerialLink:
    """A pty for host tools, bridged to whichever TCP connection the device process last made
    (or, for a board's USB CDC, `UsbCdc`: a pty that exists only while the board runs)."""

    def __init__(
        self,
        name: str,
        shaper: LinkShaper | None,
        bytes_per_second: float | None,
        on_connect: Callable[[], None],
        on_drop: Callable[[], None],
        tap: Callable[[bytes], None] | None = None,
        usb: UsbCdc | None = None,
        on_port: Callable[[str | None], None] | None = None,
    ) -> None:
        self._name = name
        self._usb = usb
        self._on_port = on_port
        # Sees every chunk the device sends (the MCU boards print on their USB console).
        self._tap = tap
        self._pending_conn: socket.socket | None = None
        self._pending_ring: int | None = None
        self._pending_detach = False
        self._pending_lock = threading.Lock()
        self._shaper = shaper
        self._on_connect = on_connect
        self._on_drop = on_drop
        self.master: int | None = None
        self.slave: int | None = None
        self.path: str | None = None
        if usb is None:
            self.master, self.slave = os.openpty()
            # Raw: no echo, no CR/LF translation, 0x03/0x04 pass through -- a binary UART.
            tty.setraw(self.slave)
            os.set_blocking(self.master, False)
            self.path = os.ttyname(self.slave)
        # USB CDC: the device's unread bytes (a dup of its end of the wire), DTR, the TX FIFO.
        self._ring_fd: int | None = None
        self._dtr = False
        self._hup = select.poll()
        self._flush_at = 0.0
        self._stuck_since: float | None = None
        self._nak = False
        self.dropped_to_host = 0
        self.last_from_host = 0.0  # monotonic times of the last bytes each way (the watchdog's log line)
        self.last_from_board = 0.0
        self.enumerations = 0
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._conn: socket.socket | None = None
        self._to_dev = _Direction(bytes_per_second)
        self._to_host = _Direction(bytes_per_second)
        self._stop = False
        self._sel = selectors.DefaultSelector()
        self._stats_lock = threading.Lock()
        self.dropped_to_device = 0
        self.connections = 0
        self._thread = threading.Thread(target=self._run, name=f"sim-{name}-bridge", daemon=True)
        self._thread.start()

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join()
        with self._pending_lock:
            if self._pending_conn is not None:
                self._pending_conn.close()
                self._pending_conn = None
            if self._pending_ring is not None:
                os.close(self._pending_ring)
                self._pending_ring = None
        self._drop_conn()
        self.listener.close()
        # The slave was held open only so the master never sees EIO when a client closes the
        # port; it goes last.
        for fd in (self.master, self.slave, self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self.master = self.slave = None

    def attach(self, conn: socket.socket, ring_fd: int | None = None) -> None:
        """Make `conn` (the supervisor's end of the device process's wire) the live device.
        `ring_fd` (USB CDC; the link owns it) is a dup of the device's end: its unread count is
        what the board has taken and not yet read."""
        with self._pending_lock:
            if self._pending_conn is not None:
                self._pending_conn.close()
            if self._pending_ring is not None:
                os.close(self._pending_ring)
            self._pending_conn = conn
            self._pending_ring = ring_fd
            self._pending_detach = False
        self._wake()

    def detach(self) -> None:
        """The device process is gone (reset, power cut): drop its wire; a USB port vanishes."""
        with self._pending_lock:
            self._pending_detach = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"a")
        except OSError:
            pass

    # -- bridge thread ------------------------------------------------------------------------

    def _run(self) -> None:
        sel = self._sel
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop:
                with self._pending_lock:
                    conn, self._pending_conn = self._pending_conn, None
                    ring, self._pending_ring = self._pending_ring, None
                    detach, self._pending_detach = self._pending_detach, False
                if detach:
                    self._drop_conn()
                if conn is not None:
                    self._adopt(conn, ring)
                now = time.monotonic()
                self._to_dev.advance(now)
                self._to_host.advance(now)
                self._poll_dtr(now)
                self._flush_to_host(now)
                self._flush_to_device()
                self._update_interest(sel)
                events = sel.select(self._timeout(time.monotonic()))
                # Accept before reading the pty: once the device has connected, host bytes that
                # arrive in the same wake-up belong to the new connection, not to the void.
                events.sort(key=lambda ev: ev[0].data != "accept")
                for key, mask in events:
                    self._dispatch(key.data, mask)
        finally:
            sel.close()

    def _timeout(self, now: float) -> float | None:
        deadlines = [d for d in (self._to_dev.deadline(), self._to_host.deadline()) if d is not None]
        usb = self._usb
        if usb is not None and self.master is not None:
            if not self._dtr:
                deadlines.append(now + usb.dtr_poll)
            else:
                if self._to_host.outbox:
                    # The flush after DTR rose; a host that does not read (the write's timeout).
                    deadlines.append(self._flush_at if self._flush_at > now else now + usb.tx_timeout / 4)
                if self._nak:
                    deadlines.append(now + usb.frame)  # NAKed: the host retries next frame
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _ring_room(self) -> int:
        """USB CDC: how many more bytes the board takes now (its ring and FIFO not yet full)."""
        assert self._usb is not None
        if self._ring_fd is None:
            return 0
        try:
            unread = _fionread(self._ring_fd)
        except OSError:
            return 0
        return self._usb.rx_bytes - unread - len(self._to_dev.outbox)

    def _update_interest(self, sel: selectors.BaseSelector) -> None:
        if self.master is None:
            pass  # a USB port that is not there
        elif self._usb is not None:
            m = 0
            # No DTR: nobody has the slave open; its hang-up would wake the selector for ever.
            # One look at the ring decides both the interest and the retry timer (_timeout):
            # the board may read between two looks.
            self._nak = self._conn is None or self._ring_room() <= 0
            if self._dtr:
                if not self._nak:
                    m |= selectors.EVENT_READ
                if self._to_host.outbox and time.monotonic() >= self._flush_at:
                    m |= selectors.EVENT_WRITE
            _set_interest(sel, self.master, m, "master")
        else:
            # Without a device, pty input is read and dropped (a UART with nobody listening).
            m = 0
            if self._conn is None or self._to_dev.has_room():
                m |= selectors.EVENT_READ
            if self._to_host.outbox:
                m |= selectors.EVENT_WRITE
            _set_interest(sel, self.master, m, "master")
        if self._conn is not None:
            c = selectors.EVENT_READ if self._room_to_host() else 0
            if self._to_dev.outbox:
                c |= selectors.EVENT_WRITE
            _set_interest(sel, self._conn, c, "conn")

    def _room_to_host(self) -> bool:
        usb = self._usb
        if usb is None:
            return self._to_host.has_room()
        # Without DTR the board's writes never wait (the FIFO overwrites); with it they wait
        # for room in the FIFO.
        return not self._dtr or len(self._to_host.outbox) < usb.tx_fifo

    def _poll_dtr(self, now: float) -> None:
        if self._usb is None or self.master is None:
            return
        hup = any(ev & select.POLLHUP for _fd, ev in self._hup.poll(0))
        if not hup and not self._dtr:
            self._flush_at = now + self._usb.dtr_flush
            self._stuck_since = None
        self._dtr = not hup

    def _dispatch(self, what: str, mask: int) -> None:
        if what == "wake":
            try:
                os.read(self._wake_r, 64)
            except BlockingIOError:
                pass
        elif what == "accept":
            self._accept()
        elif what == "master" and mask & selectors.EVENT_READ:
            self._read_master()
        elif what == "conn" and mask & selectors.EVENT_READ:
            self._read_conn()
        # EVENT_WRITE needs no handler: the next loop iteration flushes the outboxes.

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._adopt(conn)

    def _adopt(self, conn: socket.socket, ring_fd: int | None = None) -> None:
        conn.setblocking(False)
        # A device that reset may reconnect before we noticed the old socket's EOF; the newest
        # connection is the live device.
        self._drop_conn()
        self._conn = conn
        self._ring_fd = ring_fd
        if self._usb is not None:
            self._plug()
        with self._stats_lock:
            self.connections += 1
        self._on_connect()

    def _plug(self) -> None:
        """USB CDC: the board's firmware is up and the host enumerates its port (a new pty; its
        slave is not held, so the master's hang-up says whether a host has it open)."""
        master, slave = os.openpty()
        tty.setraw(slave)
        path = os.ttyname(slave)
        os.close(slave)
        os.set_blocking(master, False)
        self.master, self.path = master, path
        self._hup = select.poll()
        self._hup.register(master, select.POLLIN)
        self._dtr = False
        self._to_host.clear()
        with self._stats_lock:
            self.enumerations += 1
        if self._on_port is not None:
            self._on_port(path)

    def _unplug(self) -> None:
        if self.master is None:
            return
        if self._on_port is not None:
            self._on_port(None)
        try:
            self._sel.unregister(self.master)
        except (KeyError, ValueError):
            pass
        # The host's open port reads EOF and its writes fail (EIO), as when a USB device goes.
        os.close(self.master)
        self.master, self.path = None, None
        self._dtr = False
        self._to_host.clear()

    def _drop_conn(self) -> None:
        if self._ring_fd is not None:
            os.close(self._ring_fd)
            self._ring_fd = None
        if self._usb is not None:
            self._unplug()
        if self._conn is None:
            return
        # Unregister before closing: a new socket may reuse the fd number, and a stale key would
        # make the selector modify an fd that epoll has already forgotten.
        try:
            self._sel.unregister(self._conn)
        except KeyError:
            pass
        self._conn.close()
        self._conn = None
        # Bytes on their way into a device that reset are lost, as on a real UART.
        self._to_dev.clear()

    def _read_master(self) -> None:
        if self.master is None:
            return
        n = 4096
        if self._usb is not None:
            n = self._ring_room()
            if n <= 0:
                return
        try:
            data = os.read(self.master, n)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno == errno.EIO:  # cannot happen while we hold the slave; be safe anyway
                return
            raise
        if data:
            self.last_from_host = time.monotonic()
        if self._shaper is not None:
            data = self._shaper.to_device(data)
        if self._conn is None:
            with self._stats_lock:
                self.dropped_to_device += len(data)
            self._on_drop()
            return
        self._to_dev.push(data)

    def _read_conn(self) -> None:
        assert self._conn is not None
        try:
            data = self._conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_conn()
            return
        self.last_from_board = time.monotonic()
        if self._tap is not None:
            self._tap(data)
        if self._shaper is not None:
            data = self._shaper.to_host(data)
        self._to_host.push(data)

    def _flush_to_host(self, now: float) -> None:
        out = self._to_host.outbox
        if not out or self.master is None:
            return
        usb = self._usb
        if usb is not None:
            if not self._dtr:
                # Nobody has the port open: the TX FIFO keeps the newest bytes.
                if len(out) > usb.tx_fifo:
                    with self._stats_lock:
                        self.dropped_to_host += len(out) - usb.tx_fifo
                    del out[:-usb.tx_fifo]
                return
            if now < self._flush_at:
                return
        try:
            n = os.write(self.master, out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            if e.errno != errno.EIO:  # the host closed the port; DTR falls on the next poll
                raise
            n = 0
        del out[:n]
        if usb is not None:
            if n or not out:
                self._stuck_since = None
            elif self._stuck_since is None:
                self._stuck_since = now
            elif now - self._stuck_since >= usb.tx_timeout:
                # The board's write gave up after its timeout: what it held is lost.
                with self._stats_lock:
                    self.dropped_to_host += len(out)
                out.clear()
                self._stuck_since = None

    def _flush_to_device(self) -> None:
        out = self._to_dev.outbox
        if not out or self._conn is None:
            return
        if self._usb is not None:
            room = self._ring_room() + len(out)  # what the board takes, this outbox included
            if room <= 0:
                return
            out_now = out[:room]
        else:
            out_now = out
        try:
            n = self._conn.send(out_now)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # device died mid-write; its EOF will follow
            self._drop_conn()
            return
        del out[:n]


def _set_interest(sel: selectors.BaseSelector, fileobj: Any, mask: int, tag: str) -> None:
    try:
        key = sel.get_key(fileobj)
    except KeyError:
        if mask:
            sel.register(fileobj, mask, tag)
        return
    if not mask:
        sel.unregister(fileobj)
    elif key.events != mask:
        sel.modify(fileobj, mask, tag)


# --------------------------------------------------------------------------------------------
# UDP address assignment


def _udp_free(host: str) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((host, UDP_PORT))
    except OSError:
        return False
    finally:
        s.close()
    return True


def _udp_candidates() -> Iterator[str]:
    # 127.0.0.1 is left alone: developers often run other things on it.
    for b in range(0, 256):
        for c in range(2 if b == 0 else 1, 255):
            yield f"127.0.{b}.{c}"


_udp_locks: dict[str, Any] = {}
_LOCK_DIR = Path(tempfile.gettempdir()) / "meterota-udp"


def _lock_udp(host: str) -> bool:
    """Hold an advisory lock on host:1337 for as long as we use it, so another
    process (another sim, a test run) never takes it while our device resets."""
    _LOCK_DIR.mkdir(exist_ok=True)
    f = open(_LOCK_DIR / f"{host}.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return False
    _udp_locks[host] = f
    return True


def _claim_udp(preferred: str | None) -> str:
    with _udp_claims_lock:
        cands = ([preferred] if preferred is not None else []) + list(_udp_candidates())
        for host in cands:
            if host in _udp_claims or not _udp_free(host):
                continue
            if not _lock_udp(host):
                continue
            _udp_claims.add(host)
            return host
    raise SimError("no free loopback address for UDP port 1337")


def _release_udp(host: str) -> None:
    with _udp_claims_lock:
        _udp_claims.discard(host)
        f = _udp_locks.pop(host, None)
        if f is not None:
            f.close()


# --------------------------------------------------------------------------------------------
# Device


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _describe_rc(rc: int) -> str:
    if rc < 0:
        try:
            return f"{rc} ({signal.Signals(-rc).name})"
        except ValueError:
            return str(rc)
    return {EXIT_CLEAN: "0 (clean)", EXIT_RESET: "3 (reset)", EXIT_POWERFAIL: "86 (power fail)"}.get(
        rc, f"{rc} (crash)"
    )


class SimDevice:
    """One simulated device: a supervised MicroPython process plus its serial/UDP address."""

    def __init__(
        self,
        state_dir: Path,
        *,
        device_id: str,
        transport: Transport = "serial",
        udp_host: str | None = None,
        heap: str = DEFAULT_HEAP,
        key: bytes | None = None,
        extra: dict[str, Any] | None = None,
        provision: Callable[[Path], None] | None = None,
        shaper: LinkShaper | None = None,
        bytes_per_second: float | None = None,
        main_script: Path | None = None,
        micropython: Path | None = None,
        board: str = "unix",
        link: str = "usb",
        speed: float | None = 1.0,
    ) -> None:
        if board != "unix":
            _mcu.profile(board)  # ValueError on an unknown board
            if transport != "serial":
                raise ValueError(f"board {board}: the simulated {board} has serial links only (no Wi-Fi)")
            if link not in ("usb", "uart"):
                raise ValueError(f"link must be 'usb' or 'uart', not {link!r}")
            if speed is not None and speed <= 0:
                raise ValueError("speed must be positive")
        if transport not in ("serial", "udp"):
            raise ValueError(f"transport must be 'serial' or 'udp', not {transport!r}")
        if transport == "udp" and (shaper is not None or bytes_per_second is not None):
            raise ValueError("shaper/bytes_per_second apply to the serial bridge only")
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")
        self.state_dir = Path(state_dir).resolve()
        self.device_id = device_id
        self.transport: Transport = transport
        self.board = board
        self.link = link
        # Board speed multiplier (1.0 = the board's calibrated speed, None = host speed).
        self.speed = speed if board != "unix" else None
        self.heap = _mcu.profile(board).heap if board != "unix" and heap == DEFAULT_HEAP else heap
        self.extra: dict[str, Any] = dict(extra or {})
        if board != "unix" and link == "uart":
            self.extra.setdefault("serial", "uart:0:0:1:115200")
            if bytes_per_second is None:
                # The wire is a UART: it runs at its baud rate whatever the host does.
                bytes_per_second = int(str(self.extra["serial"]).split(":")[4]) / 10
        self.provision = provision
        self.shaper = shaper
        self.bytes_per_second = bytes_per_second
        self.main_script = Path(main_script) if main_script is not None else DEFAULT_MAIN
        if board != "unix":
            self.main_script = _mcu.LAB_BOOT
        elif self.main_script == DEFAULT_MAIN:
            # The real device program needs its flash map and a factory image.
            from .. import boards

            for k, v in boards.unix_config_extra().items():
                self.extra.setdefault(k, v)
            if self.provision is None:
                self.provision = boards.provision_unix
        self.micropython = (
            Path(micropython) if micropython is not None else Path(sys.executable).parent / "micropython"
        )
        self.key: bytes = self._initial_key(key)
        self._udp_preferred = udp_host

        self._cond = threading.Condition(threading.RLock())
        self._state = "stopped"
        self._stopping = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._monitor: threading.Thread | None = None
        self._link: _SerialLink | None = None
        self._udp_host: str | None = None
        self._log: IO[bytes] | None = None
        self._starts = 0
        self._restarts = 0
        self._exit_codes: list[int] = []
        self._crashes = 0
        self._ready_gen = 0
        # Per-run readiness: the ready line, and (serial) the bridge holding the new connection.
        self._run_line_ready = False
        self._run_connected = False
        self.dead_reason: str | None = None
        # MCU boards: the watchdog the device armed (supervisor-enforced), the throttle, the wire.
        self._wdt_ms: int | None = None
        self._wdt_deadline: float | None = None  # on _wdt_clock
        self._wdt_clock = BoardClock(os.getpid())  # the running board's, from its start on
        self._wdt_fired = False
        self._reset_cause = 1  # PWRON_RESET
        self._throttle: _mcu.Throttle | None = None
        self._duty = 1.0
        self._standin_costs = (0.0, 0.0)  # host CPU s per flash read / program the throttle refunds
        self._side: threading.Thread | None = None
        self._text = bytearray()  # console text from the device (USB link), for lines
        self.overruns = 0  # UART bytes lost in the device's FIFO (reported by the stand-in)
        # Heap bytes the port stand-ins' Python took at the last boot (C on a real board).
        self.standin_heap: int | None = None
        # Heap bytes in use when main.py started (the stand-ins, the root mount, the lab's boot
        # stage): on a board, what its firmware holds before main.py, which its free heap at boot
        # already excludes. The device code's heap figures are given net of it.
        self.firmware_heap: int | None = None
        self.wdt_resets = 0
        # The flash chip's read and program calls since this object was created, as the chip
        # reports them (in batches of 64 on the side channel, so a batch or so behind). Littlefs's
        # work: on the Pico in files mode each slot sector the boot stage moves to is a littlefs
        # file opened by path, ~25 reads.
        self.flash_reads = 0
        self.flash_programs = 0

    # -- public properties ----------------------------------------------------------------------

    @property
    def address(self) -> str:
        if self.transport == "serial":
            if self._link is None:
                raise SimError(f"{self.device_id}: not started, no serial address yet")
            if self._usb_cdc:
                # The port comes and goes with the board: its stable name (a by-id link).
                return f"serial:{self.state_dir / 'tty'}"
            return f"serial:{self._link.path}"
        if self._udp_host is None:
            raise SimError(f"{self.device_id}: not started, no UDP address yet")
        return f"udp:{self._udp_host}:{UDP_PORT}"

    @property
    def state(self) -> str:
        with self._cond:
            return self._state

    @property
    def restarts(self) -> int:
        with self._cond:
            return self._restarts

    @property
    def exit_codes(self) -> list[int]:
        with self._cond:
            return list(self._exit_codes)

    @property
    def pid(self) -> int | None:
        with self._cond:
            return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def dropped_to_device(self) -> int:
        """Bytes from the pty discarded because no device was connected (serial only)."""
        link = self._link
        if link is None:
            return 0
        with link._stats_lock:
            return link.dropped_to_device

    @property
    def log_path(self) -> Path:
        return self.state_dir / "device.log"

    def ready_generation(self) -> int:
        """How many times the device has become ready since this object was created."""
        with self._cond:
            return self._ready_gen

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, powerfail: str | None = None, timeout: float = 20.0) -> None:
        """Start the device and return once it is serving.

        ``powerfail`` ("N:before|torn:SEED") is passed as MTR_POWERFAIL to this first process
        only. Resets/power fails/crashes before ready are restarted as usual and start() keeps
        waiting; it raises SimError (after cleaning up) on timeout, a clean exit, or a crash loop.
        """
        if powerfail is not None and not _POWERFAIL_RE.match(powerfail):
            raise ValueError(f"powerfail must look like 'N:before|torn:SEED', not {powerfail!r}")
        with self._cond:
            if self._state == "running":
                raise SimError(f"{self.device_id}: already running")
        if self._monitor is not None:  # left over from a run that ended on its own
            self._monitor.join()
            self._monitor = None
        try:
            self._prepare()
            with self._cond:
                self._stopping = False
                self._crashes = 0
                self.dead_reason = None
                self._state = "running"
                gen = self._ready_gen
                if self.board == "unix":
                    self._launch("start", powerfail)
            if self.board == "unix":
                self._monitor = threading.Thread(
                    target=self._monitor_loop, name=f"sim-{self.device_id}-monitor", daemon=True
                )
            else:
                # An MCU board's process dies with the thread that forked it (PR_SET_PDEATHSIG):
                # the monitor, which lives as long as the supervision, launches it.
                launched: list[BaseException | None] = []
                ev = threading.Event()
                self._monitor = threading.Thread(
                    target=self._monitor_first, args=(powerfail, launched, ev),
                    name=f"sim-{self.device_id}-monitor", daemon=True,
                )
            self._monitor.start()
            if self.board != "unix":
                ev.wait()
                if launched and launched[0] is not None:
                    raise launched[0]
            self.wait_ready(timeout, after=gen)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 3.0) -> None:
        """Stop the device (SIGTERM, then SIGKILL after ``grace`` s) and release pty/sockets."""
        with self._cond:
            # Under the lock: the monitor either already launched its replacement process (which
            # we then see here) or will see _stopping and not launch one.
            self._stopping = True
            proc = self._proc
        if proc is not None and proc.returncode is None:
            _signal(proc, signal.SIGTERM)
            if self._throttle is not None:
                self._throttle.close()  # a stopped process handles SIGTERM only once continued
        if self._monitor is not None:
            self._monitor.join(grace)
            if self._monitor.is_alive() and proc is not None:
                _signal(proc, signal.SIGKILL)
            self._monitor.join()
            self._monitor = None
        self._release()
        with self._cond:
            if self._state == "running":
                self._state = "stopped"
            self._cond.notify_all()

    def kill(self) -> None:
        """SIGKILL the device process (pulling the plug); the supervisor restarts it like a crash."""
        with self._cond:
            proc = self._proc
        if proc is None or proc.returncode is not None:
            raise SimError(f"{self.device_id}: no running process to kill")
        _signal(proc, signal.SIGKILL)

    def wait_ready(self, timeout: float = 20.0, *, after: int | None = None) -> None:
        """Wait until the device becomes ready after generation ``after``.

        ``after=None`` means "the next ready from now". To wait for the ready that follows a reset
        you trigger, take ``g = ready_generation()`` *before* triggering it, then
        ``wait_ready(timeout, after=g)``.
        """
        with self._cond:
            gen = self._ready_gen if after is None else after
            done = self._cond.wait_for(
                lambda: self._ready_gen > gen or self._state != "running", timeout
            )
            if self._ready_gen > gen:
                return
            if not done:
                msg = f"{self.device_id}: not ready within {timeout:g}s"
            else:
                msg = f"{self.device_id}: device is {self._state} ({self.dead_reason or 'exited'})"
        raise SimError(f"{msg}; exit codes {self.exit_codes}\n--- device.log tail ---\n{self.log_tail()}")

    def wait_for(self, predicate: Callable[[SimDevice], bool], timeout: float = 20.0) -> None:
        """Block until ``predicate(self)`` holds; re-checked on every exit, restart, ready, stop
        and serial drop.

        For tests and tools that need to observe supervisor state without polling.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise SimError(f"{self.device_id}: condition not met within {timeout:g}s")

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                data = f.read()
        except FileNotFoundError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-n:])

    def __enter__(self) -> SimDevice:
        if self.state != "running":
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        try:
            addr = self.address
        except SimError:
            addr = "-"
        return f"<SimDevice {self.device_id} {addr} {self.state}>"

    # -- internals ----------------------------------------------------------------------------

    def _initial_key(self, key: bytes | None) -> bytes:
        if key is not None:
            if len(key) != 32:
                raise ValueError("key must be 32 bytes")
            return bytes(key)
        # Keep the key of an existing state dir: the provisioned flash may depend on it.
        try:
            old = json.loads((self.state_dir / "config.json").read_text())
            k = bytes.fromhex(old["key"])
            if len(k) == 32:
                return k
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return secrets.token_bytes(32)

    def _prepare(self) -> None:
        if not self.micropython.exists():
            raise SimError(f"MicroPython interpreter not found at {self.micropython}")
        if not self.main_script.exists():
            raise SimError(f"device program not found at {self.main_script}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._open_transport()
        self._write_config()
        if self.board != "unix":
            cfg = self.device_config()
            if not (self.state_dir / "flash.bin").exists():
                _mcu.provision(self.board, self.state_dir, cfg)
            _write_json_atomic(self.state_dir / "hw.json", _mcu.hw_params(self.board, self.state_dir, cfg))
            if self.speed is not None:
                self._duty = _mcu.duty_for(self.board, str(self.micropython), self.speed)
                self._standin_costs = _mcu.standin_costs(str(self.micropython))
        elif self.provision is not None and not (self.state_dir / "flash.bin").exists():
            self.provision(self.state_dir)
        if self._log is None:
            self._log = open(self.log_path, "ab", buffering=0)

    @property
    def _usb_cdc(self) -> bool:
        return self.board != "unix" and self.link == "usb"

    def _port_link(self, path: str | None) -> None:
        """Point state_dir/tty at the port (None: the port is gone, so is the link)."""
        link_path = self.state_dir / "tty"
        if path is None:
            link_path.unlink(missing_ok=True)
            return
        tmp = self.state_dir / ".tty.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(path, tmp)
        os.replace(tmp, link_path)

    def _open_transport(self) -> None:
        if self.transport == "serial":
            if self._link is None:
                usb = None
                if self._usb_cdc:
                    p = _mcu.profile(self.board)
                    usb = UsbCdc(rx_bytes=p.stdin_ring + p.cdc_rx_fifo)
                self._link = _SerialLink(
                    self.device_id, self.shaper, self.bytes_per_second, self._on_connect, self._notify,
                    tap=self._console if self._usb_cdc else None, usb=usb, on_port=self._port_link,
                )
                if usb is None:
                    assert self._link.path is not None
                    self._port_link(self._link.path)
                else:
                    self._port_link(None)  # a stale link from an earlier run
        elif self._udp_host is None:
            self._udp_host = _claim_udp(self._udp_preferred)
            # Prefer the same address if this device is started again later.
            self._udp_preferred = self._udp_host

    def device_config(self) -> dict[str, Any]:
        """The config.json an MCU board gets in its filesystem (as `meterota deploy` writes it)."""
        cfg: dict[str, Any] = {"id": self.device_id, "key": self.key.hex(), "serial": "stdin", "role": "meter"}
        if self.board == "rp2":
            cfg["variant"] = "pico"
        cfg.update({k: v for k, v in self.extra.items() if k != "layout"})
        return cfg

    def _config(self) -> dict[str, Any]:
        if self.board != "unix":
            # The host's record of the board (the device's own config is in its flash).
            return {**self.device_config(), "board": self.board, "link": self.link}
        path = self.state_dir / "config.json"
        try:
            cfg: dict[str, Any] = json.loads(path.read_text())
            if not isinstance(cfg, dict):
                cfg = {}
        except (OSError, ValueError):
            cfg = {}
        cfg.update({"id": self.device_id, "board": "unix", "role": "meter", "key": self.key.hex()})
        cfg.update(self.extra)
        # Transport keys always describe what the supervisor actually set up.
        cfg["serial"] = f"tcp:127.0.0.1:{self._link.port}" if self._link is not None else None
        cfg["udp"] = f"{self._udp_host}:{UDP_PORT}" if self._udp_host is not None else None
        return cfg

    def _write_config(self) -> None:
        _write_json_atomic(self.state_dir / "config.json", self._config())

    def _env(self, powerfail: str | None) -> dict[str, str]:
        env = dict(os.environ)
        if self.board != "unix":
            env.update(_mcu.lab_env(self.board, self.state_dir))
            env["MTR_RESET_CAUSE"] = str(self._reset_cause)
        else:
            env["MICROPYPATH"] = f"{REPO_ROOT / 'boards' / 'unix'}:{REPO_ROOT / 'device'}"
        env.pop("MTR_POWERFAIL", None)
        if powerfail is not None:
            env["MTR_POWERFAIL"] = powerfail
        return env

    def _launch(self, reason: str, powerfail: str | None) -> None:
        """Start one device process. Caller holds the lock."""
        self._starts += 1
        self._run_line_ready = False
        self._run_connected = False
        note = f"{reason}, MTR_POWERFAIL={powerfail}" if powerfail else reason
        self._log_note(f"--- start {self._starts} ({note}) ---")
        cmd = [
            str(self.micropython),
            "-X",
            f"heapsize={self.heap}",
            str(self.main_script),
            str(self.state_dir),
        ]
        if self.board != "unix":
            self._launch_mcu(cmd, powerfail)
            return
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env(powerfail),
            cwd=self.state_dir,
            start_new_session=True,  # no stray Ctrl-C from our terminal; killable as a group
        )
        self._proc = proc
        self._reader = threading.Thread(
            target=self._read_output,
            args=(proc,),
            name=f"sim-{self.device_id}-out{self._starts}",
            daemon=True,
        )
        self._reader.start()

    def _launch_mcu(self, cmd: list[str], powerfail: str | None) -> None:
        """An MCU board: its wire is a socket pair whose far end is the process's stdin (USB CDC:
        stdin and stdout, the console; UART: stdin, with stdout as the log); stderr carries the
        stand-ins' notes (watchdog, resets, overruns)."""
        assert self._link is not None
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        usb = self.link == "usb"
        # USB CDC: the bridge gives the board no more than its ring and FIFO hold (UsbCdc); it
        # counts what the board has not read on a dup of the board's end.
        ring_fd = os.dup(theirs.fileno()) if usb else None
        if not usb:
            # The UART stand-in's "ISR" takes whatever has arrived without blocking (machine.py).
            theirs.setblocking(False)
        self._text.clear()
        self._wdt_deadline = None
        self._wdt_fired = False
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=theirs.fileno(),
                stdout=theirs.fileno() if usb else subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env(powerfail),
                cwd=self.state_dir,
                start_new_session=True,
                # A board outlives a dead host on a real bench; here it must not outlive its
                # supervisor (it may be SIGSTOPped by the throttle, or spinning on a closed wire).
                preexec_fn=_die_with_parent,
            )
        except BaseException:
            if ring_fd is not None:
                os.close(ring_fd)
            raise
        finally:
            theirs.close()
        self._proc = proc
        self._link.attach(ours, ring_fd)
        if self._throttle is not None:
            self._throttle.close()
        self._throttle = _mcu.Throttle(proc.pid, self._duty) if self.speed is not None else None
        if not usb:
            self._reader = threading.Thread(
                target=self._read_output, args=(proc,), name=f"sim-{self.device_id}-out{self._starts}", daemon=True
            )
        else:
            # The console lines arrive through the bridge (self._console); the reader only waits.
            self._reader = threading.Thread(target=proc.wait, daemon=True)
        self._reader.start()
        self._side = threading.Thread(
            target=self._read_side, args=(proc,), name=f"sim-{self.device_id}-side{self._starts}", daemon=True
        )
        self._side.start()

    def _console(self, data: bytes) -> None:
        """Bytes the device wrote on its USB console: SMP frames and printed lines alike. Lines
        that are not frames go to the log, and the ready line counts as for the unix board."""
        t = self._text
        t += data
        while True:
            i = t.find(b"\n")
            if i < 0:
                if len(t) > 4096:
                    del t[:-256]
                return
            line = bytes(t[:i + 1])
            del t[:i + 1]
            # Console-framed SMP (0x06 0x09 / 0x04 0x14) and binary frames are not text.
            j = line.rfind(b"meterota: ")
            if j >= 0:
                line = line[j:]
            elif line[:2] in (b"\x06\x09", b"\x04\x14") or not _printable(line):
                continue
            if self._log is not None:
                self._log.write(line)
            if _is_ready_line(line):
                with self._cond:
                    self._run_line_ready = True
                    self._check_ready()

    def _read_side(self, proc: subprocess.Popen[bytes]) -> None:
        """The stand-ins' notes, and the watchdog: no feed within its timeout resets the board."""
        assert proc.stderr is not None
        fd = proc.stderr.fileno()
        buf = b""
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        clock = self._wdt_clock = BoardClock(proc.pid)
        try:
            while True:
                dl = self._wdt_deadline
                # On the board's clock the deadline is never nearer than in wall time: wait, then look.
                timeout = None if dl is None else max(0.0, dl - clock.now())
                if not sel.select(timeout):
                    if self._wdt_deadline is not None and clock.now() >= self._wdt_deadline:
                        self._log_note(f"--- watchdog: no feed within {self._wdt_ms} ms, reset{self._wire_state()} ---")
                        self._wdt_fired = True
                        self._wdt_deadline = None
                        _signal(proc, signal.SIGKILL)
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for ln in lines:
                    self._side_note(ln.decode("utf-8", "replace"))
        finally:
            sel.close()
            proc.stderr.close()

    def _wire_state(self) -> str:
        """What the wire did before a watchdog reset: was the board in a request, or idle?"""
        link = self._link
        if link is None or not link.last_from_host:
            return ""
        now = time.monotonic()
        return (f" (last bytes from the host {now - link.last_from_host:.1f} s ago, from the board "
                f"{now - link.last_from_board:.1f} s ago)")

    def _side_note(self, ln: str) -> None:
        if ln.startswith("W") and ln[1:].isdigit():
            self._wdt_ms = int(ln[1:])
            self._wdt_deadline = self._wdt_clock.now() + self._wdt_ms / 1000
        elif ln == "F" and self._wdt_ms:
            self._wdt_deadline = self._wdt_clock.now() + self._wdt_ms / 1000
        elif ln.startswith("O") and ln[1:].isdigit():
            self.overruns += int(ln[1:])
            self._log_note(f"--- UART overrun: {ln[1:]} bytes lost ---")
        elif ln.startswith("C") and _is_counts(ln[1:]):  # the flash chip's calls: "C<reads>,<programs>"
            reads, programs = (int(n) for n in ln[1:].partition(",")[::2])
            self.flash_reads += reads
            self.flash_programs += programs
            if self._throttle is not None:
                r, p = self._standin_costs
                self._throttle.refund(reads * r + programs * p)
        elif ln.startswith("H") and ln[1:].isdigit():
            self.standin_heap = int(ln[1:])
        elif ln.startswith("M") and ln[1:].isdigit():
            self.firmware_heap = int(ln[1:])
        elif ln == "B":
            if self._throttle is not None:
                self._throttle.begin()
        elif ln in ("R", "S"):
            pass
        elif ln:
            self._log_note(ln)  # a traceback or print to stderr

    def _log_note(self, line: str) -> None:
        if self._log is not None:
            self._log.write(line.encode() + b"\n")

    def _read_output(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        log = self._log
        try:
            for line in iter(proc.stdout.readline, b""):
                if log is not None:
                    log.write(line)
                if _is_ready_line(line):
                    with self._cond:
                        self._run_line_ready = True
                        self._check_ready()
        finally:
            proc.stdout.close()

    def _on_connect(self) -> None:
        with self._cond:
            self._run_connected = True
            self._check_ready()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _check_ready(self) -> None:
        # Serial devices count as ready only once the bridge holds their connection, so bytes a
        # client sends right after wait_ready() returns cannot be dropped as "no device".
        if self._run_line_ready and (self.transport != "serial" or self._run_connected):
            self._run_line_ready = False
            self._crashes = 0
            self._ready_gen += 1
            self._cond.notify_all()

    def _monitor_first(self, powerfail: str | None, launched: list[BaseException | None],
                       ev: threading.Event) -> None:
        try:
            with self._cond:
                self._launch("start", powerfail)
        except BaseException as e:  # handed to start()
            launched.append(e)
            ev.set()
            return
        launched.append(None)
        ev.set()
        self._monitor_loop()

    def _monitor_loop(self) -> None:
        while True:
            with self._cond:
                proc, reader = self._proc, self._reader
            assert proc is not None and reader is not None
            rc = proc.wait()
            if self._usb_cdc and self._link is not None:
                self._link.detach()  # the board reset: its USB device is gone from the bus
            # Drain the rest of its output into the log before the next start header. The device
            # does not fork, so EOF follows exit; the bound only guards against a stray child.
            reader.join(10.0)
            with self._cond:
                if not self._after_exit(rc):
                    self._cond.notify_all()
                    return
                self._cond.notify_all()

    def _after_exit(self, rc: int) -> bool:
        """Record an exit and restart per the exit-code rules. Returns False when supervision ends."""
        self._exit_codes.append(rc)
        self._log_note(f"--- exit {_describe_rc(rc)} ---")
        if self._stopping:
            return False
        if rc == EXIT_CLEAN:
            self._state = "stopped"
            return False
        wdt = self._wdt_fired
        self._wdt_fired = False
        if wdt:
            reason = "watchdog reset"
            self.wdt_resets += 1
            self._reset_cause = 3  # WDT_RESET
        elif rc == EXIT_RESET:
            reason = "reset"
            # rp2's machine.reset() goes through the watchdog; ESP32's is a software reset.
            self._reset_cause = 3 if self.board == "rp2" else 5
        elif rc == EXIT_POWERFAIL:
            reason = "power restored"
            self._reset_cause = 1
        else:
            self._reset_cause = 3
            self._crashes += 1
            if self._crashes >= MAX_CRASHES:
                self._state = "dead"
                self.dead_reason = f"{MAX_CRASHES} consecutive crashes without reaching ready"
                self._log_note(f"--- dead: {self.dead_reason} ---")
                return False
            reason = f"watchdog reset after exit {_describe_rc(rc)}"
        self._restarts += 1
        if self.board != "unix":
            # The board's reset and boot ROM/bootloader time before the firmware runs: modelled
            # hardware latency, not a synchronisation.
            time.sleep(_mcu.profile(self.board).reset_ms / 1000)
            if self._stopping:
                return False
        try:
            self._launch(reason, None)
        except OSError as e:
            self._state = "dead"
            self.dead_reason = f"restart failed: {e}"
            self._log_note(f"--- dead: {self.dead_reason} ---")
            return False
        return True

    def _release(self) -> None:
        if self._throttle is not None:
            self._throttle.close()
            self._throttle = None
        if self._link is not None:
            self._link.close()
            self._link = None
            self._port_link(None)
        if self._udp_host is not None:
            _release_udp(self._udp_host)
            self._udp_host = None
        if self._log is not None:
            self._log.close()
            self._log = None
        with self._cond:
            self._proc = None
            self._reader = None


def _die_with_parent() -> None:
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _printable(line: bytes) -> bool:
    return all(32 <= b < 127 or b in (9, 10, 13) for b in line)


def _is_ready_line(line: bytes) -> bool:
    # The contract line is exactly "meterota: ready"; boards/unix/board.py appends the device id
    # and "recovery" after a space, which must count too (but "meterota: ready-ish" must not).
    line = line.rstrip(b"\r\n")
    if not line.startswith(READY_LINE):
        return False
    rest = line[len(READY_LINE) :]
    return not rest or rest[:1].isspace()


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:  # already gone
        pass


# --------------------------------------------------------------------------------------------
# Cluster


class SimCluster:
    """``count`` devices under ``base_dir/dev-0001`` ..., ids ``meter-0001`` ..., same options."""

    def __init__(
        self,
        base_dir: Path,
        count: int,
        *,
        transport: Transport = "serial",
        id_prefix: str = "meter-",
        heap: str = DEFAULT_HEAP,
        extra: dict[str, Any] | None = None,
        provision: Callable[[Path], None] | None = None,
        shaper_factory: Callable[[], LinkShaper] | None = None,
        bytes_per_second: float | None = None,
        main_script: Path | None = None,
        micropython: Path | None = None,
        board: str = "unix",
        link: str = "usb",
        speed: float | None = 1.0,
    ) -> None:
        if count < 1:
            raise ValueError("count must be >= 1")
        self.base_dir = Path(base_dir)
        self.devices: list[SimDevice] = [
            SimDevice(
                self.base_dir / f"dev-{i:04d}",
                device_id=f"{id_prefix}{i:04d}",
                transport=transport,
                heap=heap,
                extra=extra,
                provision=provision,
                shaper=shaper_factory() if shaper_factory is not None else None,
                bytes_per_second=bytes_per_second,
                main_script=main_script,
                micropython=micropython,
                board=board,
                link=link,
                speed=speed,
            )
            for i in range(1, count + 1)
        ]

    def start(self, timeout: float = 20.0) -> None:
        """Start all devices in parallel; on any failure stop them all and re-raise."""
        with ThreadPoolExecutor(max_workers=min(16, len(self.devices))) as pool:
            futures = [pool.submit(d.start, None, timeout) for d in self.devices]
            errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            self.stop()
            raise first

    def stop(self) -> None:
        with ThreadPoolExecutor(max_workers=min(16, len(self.devices))) as pool:
            list(pool.map(lambda d: d.stop(), self.devices))

    def __enter__(self) -> SimCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __iter__(self) -> Iterator[SimDevice]:
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    def __getitem__(self, i: int) -> SimDevice:
        return self.devices[i]


# --------------------------------------------------------------------------------------------
# CLI (`meterota sim`)


def add_sim_arguments(p: argparse.ArgumentParser) -> None:
    """Options read by run_sim_cli(); call this on the `sim` sub-parser."""
    p.add_argument("--count", type=int, default=1, help="number of devices (default 1)")
    p.add_argument("--transport", choices=["serial", "udp"], default="serial")
    p.add_argument("--dir", type=Path, default=Path(".meterota/sim"), help="base state directory")
    p.add_argument("--json", action="store_true", help="one JSON object per device per line")
    p.add_argument("--heap", default=DEFAULT_HEAP, help="MicroPython heap, e.g. 128wK")
    p.add_argument("--baud", type=int, default=None, help="pace serial links like a UART (bytes/s = baud/10)")
    p.add_argument("--main", dest="main_script", type=Path, default=None, help="device program")
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config.json entry; VALUE is parsed as JSON, else kept as a string",
    )
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for each device (default 20; 120 for --board rp2/esp32)")
    b = p.add_argument_group("simulated MCU boards (the board's own code under its port's stand-ins)")
    b.add_argument("--board", choices=["unix", *_mcu.BOARDS], default="unix",
                   help="unix (default): the simulator board; rp2 (Pico) or esp32: that board's code, flash "
                        "timing, watchdog, heap and CPU speed")
    b.add_argument("--link", choices=["usb", "uart"], default="usb",
                   help="rp2/esp32: the console over USB CDC (default) or a UART paced at its baud rate")
    b.add_argument("--speed", type=float, default=1.0,
                   help="rp2/esp32: CPU speed as a multiple of the board's (default 1.0; 0 = unthrottled)")


def _parse_extra(items: list[str]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            extra[k] = json.loads(v)
        except ValueError:
            extra[k] = v
    return extra


def run_sim_cli(args: argparse.Namespace, *, provision: Callable[[Path], None] | None = None,
                on_started: Callable[[SimCluster], None] | None = None) -> int:
    """Start the devices, print their addresses, serve until SIGINT/SIGTERM, stop. Returns 0."""
    baud = getattr(args, "baud", None)
    transport: Transport = "udp" if getattr(args, "transport", "serial") == "udp" else "serial"
    try:
        cluster = SimCluster(
            Path(getattr(args, "dir", Path(".meterota/sim"))),
            int(getattr(args, "count", 1)),
            transport=transport,
            heap=getattr(args, "heap", DEFAULT_HEAP),
            extra=_parse_extra(list(getattr(args, "extra", None) or [])),
            provision=provision,
            bytes_per_second=baud / 10 if baud and transport == "serial" else None,
            main_script=getattr(args, "main_script", None),
            board=getattr(args, "board", "unix"),
            link=getattr(args, "link", "usb"),
            speed=(getattr(args, "speed", 1.0) or None),
        )
    except ValueError as e:
        print(f"meterota sim: {e}", file=sys.stderr)
        return 2

    stop_requested = threading.Event()
    old_handlers: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, lambda *_: stop_requested.set())
    try:
        try:
            timeout = getattr(args, "timeout", None)
            if timeout is None:
                timeout = 20.0 if getattr(args, "board", "unix") == "unix" else 120.0
            cluster.start(timeout=float(timeout))
        except SimError as e:
            print(f"meterota sim: {e}", file=sys.stderr)
            return 1
        if on_started is not None:
            on_started(cluster)
        for d in cluster:
            if getattr(args, "json", False):
                line = json.dumps(
                    {"id": d.device_id, "address": d.address, "state_dir": str(d.state_dir), "key": d.key.hex()}
                )
            else:
                line = f"{d.device_id} {d.address} {d.state_dir}"
            print(line, flush=True)
        stop_requested.wait()
        return 0
    finally:
        cluster.stop()
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    """`python -m meterota.lab.sim ...`: the same as `meterota sim`, without provisioning."""
    p = argparse.ArgumentParser(prog="python -m meterota.lab.sim", description=__doc__.splitlines()[0])
    add_sim_arguments(p)
    return run_sim_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
