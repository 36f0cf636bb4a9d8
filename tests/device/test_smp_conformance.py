"""SMP conformance of the device where Zephyr is the reference (issue 15, items
13 and 14), under MicroPython through the real dispatcher: an empty hash in an
image state write, the SMP v1 translation of image (and OS) group errors, and
bootloader information answered as MCUboot does.

The v1 translation facts are tests/device/vectors/smp_v1_errors.json (Zephyr's
img_mgmt_translate_error_code); the host test checks the same file against the
`smp` library's enums, so device and host read the facts from one place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cbor2
import pytest

from conftest import run_mp
from test_protocol_vectors import _dispatch, _req, _state_dir

V1_VECTORS = Path(__file__).parent / "vectors" / "smp_v1_errors.json"


@pytest.fixture(scope="module")
def v1() -> dict[str, Any]:
    return dict(json.loads(V1_VECTORS.read_text()))


def _bodies(tmp_path: Path, frames: list[bytes]) -> list[Any]:
    return [None if o is None else cbor2.loads(o[8:]) for o in _dispatch(tmp_path, frames)]


def test_v1_translation_of_every_image_error_is_zephyrs(tmp_path: Path, v1: dict[str, Any]) -> None:
    rcs = [e["rc"] for e in v1["img_mgmt_err"]]
    out = run_mp(tmp_path, "import json, imgerr\nprint(json.dumps([imgerr.v1_rc(rc) for rc in %r]))" % rcs)
    got = dict(zip(rcs, json.loads(out.stdout)))
    want = {e["rc"]: v1["mgmt_err"][e["v1"]] for e in v1["img_mgmt_err"]}
    wrong = {rc: (got[rc], want[rc]) for rc in rcs if got[rc] != want[rc]}
    assert not wrong, f"image group rc -> (device's v1 rc, Zephyr's): {wrong}"
    # The ones the issue found: header magic, version query, vector table, too large, overrun.
    assert all(got[rc] == v1["mgmt_err"]["EUNKNOWN"] for rc in (23, 26, 29, 30, 31))


def test_v1_and_v2_clients_get_the_same_refusal_in_their_own_form(tmp_path: Path, v1: dict[str, Any]) -> None:
    bad_magic = cbor2.dumps({"off": 0, "data": b"\x00" * 40, "len": 40})
    fmt = cbor2.dumps({"format": "z"})
    b = _bodies(tmp_path, [
        _req(2, 1, 1, bad_magic),  # v2: group error 23 (INVALID_IMAGE_HEADER_MAGIC)
        _req(2, 1, 1, bad_magic, ver=0),  # v1: Zephyr's EUNKNOWN, not EINVAL
        _req(0, 0, 7, fmt),  # v2: OS group INVALID_FORMAT
        _req(0, 0, 7, fmt, ver=0),  # v1: EINVAL (os_mgmt_translate_error_code)
        _req(0, 0, 8, cbor2.dumps({"query": "nope"}), ver=0),  # v1: QUERY_YIELDS_NO_ANSWER -> ENOENT
    ])
    e = v1["mgmt_err"]
    assert b[0] == {"err": {"group": 1, "rc": 23}}
    assert b[1] == {"rc": e["EUNKNOWN"]}
    assert b[2] == {"err": {"group": 0, "rc": 2}}
    assert b[3] == {"rc": e["EINVAL"]}
    assert b[4] == {"rc": e["ENOENT"]}


def test_state_write_with_an_empty_hash_confirms_the_running_image(tmp_path: Path) -> None:
    b = _bodies(tmp_path, [
        _req(2, 1, 0, cbor2.dumps({"hash": b"", "confirm": True})),  # Zephyr: no hash -> the running image
        _req(2, 1, 0, cbor2.dumps({"hash": b"", "confirm": False})),  # a test needs a hash
        _req(2, 1, 0, cbor2.dumps({"hash": b"", "confirm": True}), ver=0),
    ])
    assert "err" not in b[0] and "rc" not in b[0], b[0]
    running = [i for i in b[0]["images"] if i.get("active")]
    assert len(running) == 1 and running[0]["confirmed"]
    assert b[1] == {"err": {"group": 1, "rc": 24}}  # INVALID_HASH, as for a missing hash
    assert "images" in b[2]


BOOTINFO = r"""
import json, binascii
import board, receiver, updater, cbor
b = board.Board(%r)
updater.Updater(b).select_boot()
ctx, disp = receiver.build(b)
ctx.allow_downgrade = %r
for body in (b"\xa0", cbor.dumps({"query": "mode"}), cbor.dumps({"query": "nope"})):
    body = bytes(body)
    req = bytes([1 << 3, 0, 0, len(body), 0, 0, 1, 8]) + body
    print(binascii.hexlify(disp.handle(req)).decode())
# meterota's own identity stays in group 64
r = disp.handle(bytes([1 << 3, 0, 0, 1, 0, 64, 2, 0, 0xa0]))
print(binascii.hexlify(r).decode())
"""


@pytest.mark.parametrize("allow_downgrade", [False, True])
def test_bootloader_information_is_mcuboots_direct_xip_with_revert(tmp_path: Path, allow_downgrade: bool) -> None:
    from smp import os_management as osm

    d = _state_dir(tmp_path)
    out = run_mp(tmp_path, BOOTINFO % (str(d), allow_downgrade)).stdout.split()
    intro, mode, nope, info = (cbor2.loads(bytes.fromhex(x)[8:]) for x in out)
    assert intro == {"bootloader": "MCUboot"}
    # What a standard client (smpclient's `smp` models) makes of the replies.
    assert osm.BootloaderInformationReadResponse.loads(bytes.fromhex(out[0])).bootloader == "MCUboot"
    q = osm.MCUbootModeQueryResponse(**mode)
    assert q.mode == osm.MCUbootMode.DIRECT_XIP_WITH_REVERT and bool(q.no_downgrade) is not allow_downgrade
    # MCUboot's enum mcuboot_mode: 5 = direct-XIP with revert; "no-downgrade" is sent, true, only
    # when downgrades are refused (Zephyr's os_mgmt and its group 0 documentation).
    assert mode == ({"mode": 5} if allow_downgrade else {"mode": 5, "no-downgrade": True})
    assert nope == {"err": {"group": 0, "rc": 3}}  # QUERY_YIELDS_NO_ANSWER
    assert info["bootloader"] == "meterota" and info["id"] == "meter-t"
