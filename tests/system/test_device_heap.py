"""The meter receiver within its heap budget: a compressed upload at 48 KiB
(32-bit equivalent, -X heapsize=48wK), code a request needs loaded for it and
released after, and the device's own heap figures (group 64 cmd 2)."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest

from meterota import protocol as P
from meterota.client import SMPClient, SMPError
from meterota.image import parse
from meterota.lab.sim import SimDevice
from meterota.transport import from_address

from conftest import Images, run_mp

# The meter receiver's heap target during a deflate upload (README, tools/bench.py HEAP_TARGET_WK).
TARGET = "48wK"
WORD_BYTES = 8  # this host's unix port; -X heapsize=NwK gives N KiB of 32-bit words, 2N KiB here


def _client(dev: SimDevice) -> SMPClient:
    t = from_address(port=dev.address)
    t.open()
    c = SMPClient(t, timeout=3.0)
    c.connect()
    return c


def _upload(c: SMPClient, data: bytes) -> None:
    c.image_erase(1)
    st = c.upload(data, compress=True)
    assert st.match is True and st.wire_bytes < len(data) * 0.9, st


def test_deflate_upload_fits_the_meter_heap_target(make_device: Callable[..., SimDevice], images: Images) -> None:
    """Two compressed uploads back to back at 48wK, the second while both slots hold
    verified images (every device after its first upgrade). Before the boot stage
    released its modules and the heap was kept in one piece this needed 82wK."""
    dev = make_device("serial", heap=TARGET)
    first = images.app("1.8.0").read_bytes()
    second = images.app("1.9.0", app_py="def poll():\n    pass\n").read_bytes()
    c = _client(dev)
    try:
        _upload(c, first)
        _upload(c, second)
        slots = {e["slot"]: e for e in c.image_state()}
        assert slots[1]["hash"] == parse(second).hash
        s = c.stats()
        total = 48 * 1024 * WORD_BYTES // 4
        assert 0 < s["heap_alloc"] <= s["heap_peak"] <= total
        assert s["heap_alloc"] + s["heap_free"] <= total
    finally:
        c.t.close()
    assert dev.restarts == 0 and dev.exit_codes == [], dev.log_tail()


def test_rare_requests_load_their_code_and_release_it(make_device: Callable[..., SimDevice]) -> None:
    """OS info, meterota info and record, image state and erase are loaded per request
    (smp.call_lazy): the heap in use after them is what it was before."""
    dev = make_device("serial")
    c = _client(dev)
    try:
        c.stats()
        before = c.stats()["heap_alloc"]
        c.info()
        c.image_state()
        c.image_erase(1)
        c.request(P.Op.READ, P.Group.OS, 7, {"format": "a"})
        c.request(P.Op.READ, P.Group.OS, 0, {"d": "hello"})
        after = c.stats()["heap_alloc"]
        assert after - before < 1024, (before, after)
    finally:
        c.t.close()


LAZY = """
import sys, gc, smp, cbor, struct, bootstate

class Ctx:
    buf_size = 2048
    buf_count = 4
    device_id = "m"
    key = bytes(32)
    class up:
        class st:
            result = bootstate.RES_NONE

d = smp.Dispatcher()
ctx = Ctx()
smp.call_lazy("grp_os", "register", d, ctx)
smp.call_lazy("grp_meterota", "register", d, ctx)
assert "grp_os" not in sys.modules and "grp_meterota" not in sys.modules

def req(op, group, cmd, body):
    b = bytearray(8)
    cbor.dumps(body, b)
    struct.pack_into(">BBHHBB", b, 0, 8 | op, 0, len(b) - 8, group, 1, cmd)
    r = d.handle(b)
    return cbor.loads(memoryview(r)[8:])

print(req(0, 0, 6, {}))
print(req(0, 0, 8, {}))
print(req(0, 64, 1, {}))
print(sorted(k for k in ("grp_os", "grp_meterota", "record") if k in sys.modules))
"""


def test_lazy_handlers_drop_their_modules(tmp_path: Path) -> None:
    """Under MicroPython: a lazily registered command runs from its module, and the
    module and what it imported (grp_meterota -> record) are gone after the request."""
    out = run_mp(tmp_path, LAZY).stdout.split("\n")
    assert "'buf_size': 2048" in out[0]
    assert "'bootloader': 'MCUboot'" in out[1]
    assert "'rc': 2" in out[2]  # no confirmation record yet: the handler ran, from grp_meterota
    assert out[3] == "[]"


def test_deflate_block_crossing_a_sector_or_inflating_long(make_device: Callable[..., SimDevice],
                                                          images: Images) -> None:
    """A host that cuts blocks across 4 KiB sectors (older meterota) still uploads; a
    block that inflates to more than its rlen is refused and nothing of it is written."""
    dev = make_device("serial")
    data = images.app("1.8.0").read_bytes()
    c = _client(dev)
    try:
        c.image_erase(1)
        sha = hashlib.sha256(data).digest()
        first = {"off": 0, "len": len(data), "sha": sha, "image": 1}
        r = c.request(P.Op.WRITE, P.Group.IMAGE, 1, {**first, "data": data[:1000]})
        off = r["off"]
        assert off == 1000
        z = zlib.compressobj(9, zlib.DEFLATED, -9)
        long_block = z.compress(data[off:off + 600]) + z.flush()
        with pytest.raises(SMPError) as e:
            c.request(P.Op.WRITE, P.Group.METEROTA, 3, {"off": off, "rlen": 500, "data": long_block})
        assert e.value.rc == 3
        assert c.info()["upload"]["off"] == off
        crossing = 0
        while off < len(data):
            n = min(2048, len(data) - off)  # from 1000 on, every other block crosses a sector boundary
            crossing += off // 4096 != (off + n - 1) // 4096
            z = zlib.compressobj(9, zlib.DEFLATED, -9)
            r = c.request(P.Op.WRITE, P.Group.METEROTA, 3,
                          {"off": off, "rlen": n, "data": z.compress(data[off:off + n]) + z.flush()})
            assert r["off"] == off + n
            off = r["off"]
        assert r.get("match") is True and crossing > 4
    finally:
        c.t.close()
