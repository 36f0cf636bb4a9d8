"""meterota chooses compression from the link's measured rate and the board's
inflate rate (meterota.rates): a paced UART-speed link compresses, the unpaced
pty (where deflate ran at 1.5 MB/s against 2.9 MB/s raw) goes raw."""

from __future__ import annotations

from typing import Callable

import pytest

from meterota.client import SMPClient
from meterota.lab.sim import SimDevice
from meterota.transport import from_address

from conftest import Images


@pytest.mark.parametrize("bps, want", [(92_160, True), (None, False)], ids=["uart-921600", "pty-unpaced"])
def test_compression_follows_the_link(make_device: Callable[..., SimDevice], images: Images,
                                      bps: float | None, want: bool) -> None:
    dev = make_device("serial", bytes_per_second=bps)
    data = images.app("1.8.0").read_bytes()
    t = from_address(port=dev.address)
    t.open()
    try:
        c = SMPClient(t, timeout=3.0)
        c.connect()
        link = c.link_rate()
        if bps:
            assert 0.5 * bps < link < 1.5 * bps  # the echo probe sees the pacing
        st = c.upload(data)
        assert st.match is True
        assert st.compressed is want, st.compress_why
        assert (st.wire_bytes < 0.9 * len(data)) is want
        if want:
            # The board measured its own inflate rate: the next connection chooses with it.
            assert c.info()["inflate_bps"] > 1_000_000
    finally:
        t.close()
