"""The lab's USB CDC bridge (lab/sim.py UsbCdc) on its own: a socket pair stands for the board's
wire, so the window and the DTR rules are checked byte for byte, without a board process."""

from __future__ import annotations

import os
import select
import socket
import time
from pathlib import Path

import pytest
import serial

from meterota.lab.sim import UsbCdc, _fionread, _SerialLink


def _link(tmp_path: Path) -> tuple[_SerialLink, socket.socket, list[str | None]]:
    ports: list[str | None] = []
    link = _SerialLink("t", None, None, lambda: None, lambda: None, usb=UsbCdc(rx_bytes=768),
                       on_port=ports.append)
    ours, board = socket.socketpair()
    link.attach(ours, os.dup(board.fileno()))
    return link, board, ports


def _wait(cond, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        select.select([], [], [], 0.005)  # polling a condition the bridge thread sets


def test_a_closed_port_keeps_the_newest_256_bytes_and_the_board_takes_768_ahead(tmp_path: Path) -> None:
    link, board, ports = _link(tmp_path)
    try:
        _wait(lambda: bool(ports) and ports[-1] is not None, "the port enumerates")
        path = ports[-1]
        assert path is not None
        # No host has the port open (DTR low): the board's output overwrites its TX FIFO.
        board.sendall(bytes(range(256)) * 3 + b"newest")
        _wait(lambda: link.dropped_to_host == 3 * 256 + 6 - 256, "old bytes dropped")
        host = serial.Serial(path, timeout=2)
        got = host.read(256)
        assert got == (bytes(range(256)) * 3 + b"newest")[-256:]
        # The host writes more than the board's ring and FIFO hold: the board has taken 768.
        host.write(b"x" * 5000)
        _wait(lambda: _fionread(board.fileno()) == 768, "the window fills")
        assert len(board.recv(4096)) == 768  # never more than the window, however long it waited
        _wait(lambda: _fionread(board.fileno()) == 768, "the window refills once the board read")
        # The board goes (a reset): the port vanishes and the open one fails.
        link.detach()
        _wait(lambda: ports[-1] is None, "the port vanishes")
        with pytest.raises(serial.SerialException):
            host.read(1)
        host.close()
    finally:
        link.close()
        board.close()
