"""The host's reset wait follows the device: a board says how long its boot took to answer
(`ready_ms`, group 64 info) and `meterota upgrade` waits for two such boots after the reset into
a test image, since one that fails at import reverts before anything answers. On the simulated
Pico at speed 1.0 a boot took 56-90 s on a loaded host, so the two boots of a reverting trial ran
past the board's fixed 120 s and the HIL test of a trial that raises at import failed."""

from __future__ import annotations

from typing import Callable

from meterota.client import SMPClient
from meterota.lab.sim import SimDevice
from meterota.transport import from_address
from meterota.upgrade import BOOT_EXTRA_S, BOOT_FACTOR, RESET_WAIT, reset_wait


def test_the_reset_wait_covers_two_boots_at_the_pace_the_device_reports(
        make_device: Callable[..., SimDevice]) -> None:
    dev = make_device("serial")
    t = from_address(port=dev.address)
    t.open()
    try:
        c = SMPClient(t, timeout=3.0)
        c.connect()
        assert c.device_info is not None
        ready_ms = c.device_info["ready_ms"]
        assert isinstance(ready_ms, int) and ready_ms > 0, ready_ms
        board = str(c.device_info["board"])
        one = BOOT_FACTOR * ready_ms / 1000 + BOOT_EXTRA_S
        assert reset_wait(c) >= max(RESET_WAIT[board], one)
        assert reset_wait(c, boots=2) >= max(RESET_WAIT[board], 2 * one)
        assert reset_wait(c, 7.0, boots=2) == 7.0  # --reset-timeout is the user's
        # A board that reported a 90 s boot (the loaded simulated Pico): two boots are 380 s,
        # where the fixed wait was 120 s.
        c.device_info = dict(c.device_info, board="rp2", ready_ms=90_000)
        assert reset_wait(c, boots=2) == 2 * (BOOT_FACTOR * 90 + BOOT_EXTRA_S) == 380.0
        assert reset_wait(c) == 190.0
        # One that says nothing (a standard SMP server, an older receiver) keeps the board's.
        c.device_info = dict(c.device_info, ready_ms=None)
        assert reset_wait(c, boots=2) == RESET_WAIT["rp2"]
    finally:
        t.close()
