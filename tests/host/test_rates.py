"""The compression choice from rates (meterota.rates): deflate where the link is
slower than what compressing costs the board and the host, raw elsewhere."""

from __future__ import annotations

import math

import pytest

from meterota import rates

APP = rates.Sample(ratio=0.64, host_bps=4_000_000)  # a bundle's blocks, as measured on this host


@pytest.mark.parametrize("link, inflate, want", [
    (92_160, 20_000_000, True),  # UART at 921600 baud, the host CPU inflating: the line is the limit
    (11_520, 1_000_000, True),  # 115200 baud, a board inflating at 1 MB/s
    (math.inf, 20_000_000, False),  # the unpaced pty: nothing to save, CPU to spend
    (20_000_000, 20_000_000, False),  # a link faster than the host compresses
    (1_000_000, 1_000_000, False),  # USB CDC at about what the board inflates: raw
    (11_520, 40_000, False),  # a board inflating slower than compressing saves on the line
])
def test_choice_follows_the_rates(link: float, inflate: float, want: bool) -> None:
    c = rates.choose(link, inflate, APP)
    assert c.compress is want, c.why
    assert ("saves" if want else "costs") in c.why


def test_incompressible_image_goes_raw_even_on_a_slow_link() -> None:
    assert not rates.choose(11_520, rates.BOARD_INFLATE_BPS["unix"], rates.Sample(1.0, 4e6)).compress


@pytest.mark.parametrize("port, want", [
    ("/dev/ttyUSB0", 11_520.0), ("/dev/ttyAMA0", 11_520.0), ("COM4", 11_520.0),
    ("/dev/ttyACM0", None), ("/dev/cu.usbmodem1101", None), ("/dev/pts/7", None), ("socket://127.0.0.1:5", None),
])
def test_uart_ports_are_known_by_their_baud(port: str, want: float | None) -> None:
    assert rates.uart_rate(port, 115200) == want


def test_link_rate_from_echoes() -> None:
    # 1008 more bytes each way took 20 ms more: 100.8 kB/s.
    assert rates.link_rate_from_echoes([0.004, 0.005], [0.024, 0.03], 16, 1024) == pytest.approx(100_800)
    # Below the clock's resolution, or negative from noise: faster than measurable.
    assert rates.link_rate_from_echoes([0.003], [0.0031], 16, 1024) == math.inf
    assert rates.link_rate_from_echoes([0.003], [0.0025], 16, 1024) == math.inf
