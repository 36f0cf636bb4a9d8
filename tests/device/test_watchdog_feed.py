"""The receiver feeds a board's watchdog for every request it handles, not only once per poll: a
link's service drains every frame its stream holds, and on an RP2040, whose watchdog cannot be
stopped once a trial boot armed it (8.3 s at most), a few slow requests in one service could reset
a confirmed board. Found while chasing "watchdog: no feed within 8000 ms" resets of confirmed
boards on the simulated Pico at its own speed (those resets have another cause as well: see README,
"Lab rig")."""

from __future__ import annotations

import socket
from pathlib import Path

from conftest import run_mp

CODE = r"""
import socket, receiver
ADDR = socket.getaddrinfo("127.0.0.1", PORT)[0][-1]

class Board:
    feeds = 0
    def feed(self):
        Board.feeds += 1

class Link:
    # One poll's service with three frames waiting (as link.StreamLink drains its stream).
    def __init__(self):
        self.obj = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.obj.bind(ADDR)
    def service(self, handle):
        self.obj.recv(16)
        for _ in range(3):
            handle(b"frame", "serial")
    def idle(self):
        pass

class Disp:
    seen = []
    def handle(self, frame, origin=None):
        Disp.seen.append(Board.feeds)  # feeds before this request
        return None

class Ctx:
    board = Board()
    links = [Link()]
    reset_requested = False

ctx = Ctx()
pump = receiver.Pump(ctx, Disp())
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"x", ADDR)
pump(1000)
print("feeds", Board.feeds, "seen", Disp.seen)
"""


def test_every_request_feeds_the_watchdog(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_mp(tmp_path, CODE.replace("PORT", str(port))).stdout
    assert "feeds 4 seen [2, 3, 4]" in out, out
