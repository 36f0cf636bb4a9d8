"""The device core end to end: real MicroPython devices (the unix board), real
smpmgr, real imgtool images, over a pty and over UDP."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import serial

from conftest import VECTORS, Images, hil_mode, run_cli, smpmgr_target, sim_client
from meterota import protocol as P
from meterota.client import SMPClient, SMPError
from meterota.image import parse
from meterota.lab.sim import SimDevice
from meterota.transport import from_address

TRANSPORTS = ["serial", "udp"]


def client(dev: SimDevice) -> SMPClient:
    return sim_client(dev, timeout=2.0, negotiate=False)


def state(dev: SimDevice) -> dict[int, dict[str, Any]]:
    c = client(dev)
    try:
        return {e["slot"]: e for e in c.image_state()}
    finally:
        c.close()  # smpmgr may come next: no reply owed for a retried try left on the port


def info(dev: SimDevice) -> dict[str, Any]:
    c = client(dev)
    try:
        return c.info()
    finally:
        c.close()


def smpmgr(dev: SimDevice, *args: str, check: bool = True) -> Any:
    return run_cli("smpmgr", *smpmgr_target(dev), *args, check=check)


def reset_and_wait(dev: SimDevice, how: Callable[[], object]) -> None:
    gen = dev.ready_generation()
    how()
    dev.wait_ready(after=gen)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_smpmgr_upload_test_reset_confirm(make_device: Callable[..., SimDevice], images: Images,
                                          transport: str) -> None:
    dev = make_device(transport)
    app = images.app("1.1.0")
    h = parse(app.read_bytes()).hash
    smpmgr(dev, "image", "upload", str(app), "--slot", "1")
    s = state(dev)
    assert s[1]["hash"] == h and not s[1].get("pending")
    smpmgr(dev, "image", "state-write", h.hex())
    s = state(dev)
    assert s[1]["hash"] == h and s[1]["pending"] and not s[1].get("permanent")
    assert s[0]["active"] and s[0]["confirmed"]
    reset_and_wait(dev, lambda: smpmgr(dev, "os", "reset"))
    s = state(dev)
    assert s[0]["hash"] == h and s[0]["active"] and not s[0].get("confirmed")
    assert s[1]["confirmed"]  # the previous image is the fallback
    smpmgr(dev, "image", "state-write", "--confirm")
    s = state(dev)
    assert s[0]["hash"] == h and s[0]["confirmed"] and s[0]["version"] == "1.1.0"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_smpmgr_one_shot_upgrade(make_device: Callable[..., SimDevice], images: Images, transport: str) -> None:
    dev = make_device(transport)
    app = images.app("1.2.0")
    gen = dev.ready_generation()
    smpmgr(dev, "upgrade", "--slot", "1", str(app))
    dev.wait_ready(after=gen)
    s = state(dev)
    assert s[0]["version"] == "1.2.0" and not s[0].get("confirmed")


def test_unconfirmed_image_reverts_after_second_reset(make_device: Callable[..., SimDevice], images: Images) -> None:
    dev = make_device("udp")
    app = images.app("1.1.0")
    old = state(dev)[0]["hash"]
    gen = dev.ready_generation()
    smpmgr(dev, "upgrade", "--slot", "1", str(app))
    dev.wait_ready(after=gen)
    assert state(dev)[0]["version"] == "1.1.0"
    reset_and_wait(dev, lambda: smpmgr(dev, "os", "reset"))
    s = state(dev)
    assert s[0]["hash"] == old and s[0]["confirmed"] and s[0]["version"] == "1.0.0"
    i = info(dev)
    assert i["revert_reason"] == "not confirmed before reset"
    assert not i["trial"]


def test_app_that_raises_at_import_reverts_with_reason(make_device: Callable[..., SimDevice],
                                                       images: Images) -> None:
    dev = make_device("udp")
    bad = images.app("1.3.0", app_py="raise RuntimeError('sensor bus dead')\n")
    gen = dev.ready_generation()
    smpmgr(dev, "upgrade", "--slot", "1", str(bad))
    # It boots the test image, which raises before it is ready; the boot
    # stage records why and resets: the next ready is the old image's.
    dev.wait_ready(after=gen)
    assert dev.exit_codes[-2:] == [3, 3]
    s = state(dev)
    assert s[0]["version"] == "1.0.0" and s[0]["confirmed"]
    assert "sensor bus dead" in info(dev)["revert_reason"]
    assert "RuntimeError" in dev.log_tail(80)


@pytest.mark.parametrize("restart", [False, True], ids=["same-process", "after-device-restart"])
def test_interrupted_upload_resumes_from_device_offset(make_device: Callable[..., SimDevice], images: Images,
                                                       restart: bool) -> None:
    dev = make_device("serial")
    data = images.app("1.4.0").read_bytes()
    c = client(dev)
    seen: list[int] = []

    class Cut(Exception):
        pass

    def cut(done: int, total: int) -> None:
        seen.append(done)
        if done > 20000:
            raise Cut

    with pytest.raises(Cut):
        c.upload(data, progress=cut, window=1)
    c.t.close()
    if restart:
        gen = dev.ready_generation()
        dev.kill()  # power pulled mid-upload
        dev.wait_ready(after=gen)
    c = client(dev)
    st = c.upload(data, window=1)
    c.t.close()
    assert st.match is True
    assert st.resumed_from > 0
    if restart:
        # Only whole sectors that reached flash survive a power cut.
        assert st.resumed_from % 4096 == 0 and st.resumed_from <= max(seen)
    else:
        assert st.resumed_from == max(seen)
    assert state(dev)[1]["hash"] == parse(data).hash


def _upload_first(dev: SimDevice, body: dict[str, Any]) -> SMPError:
    c = client(dev)
    try:
        with pytest.raises(SMPError) as e:
            c.request(P.Op.WRITE, P.Group.IMAGE, 1, body, what="upload")
        return e.value
    finally:
        c.t.close()


def test_the_last_chunk_sent_again_after_its_reply_was_lost_completes(make_device: Callable[..., SimDevice],
                                                                      images: Images) -> None:
    """An upload's last request reads the image back and verifies it (10 s on the simulated Pico
    at its speed): a host that gave up waiting sends that chunk again. The device answers that
    the image is in, not off=0 ("no session: start over"), which made the host upload everything
    again and report it as resumed from the end (the HIL resume test against the Pico)."""
    dev = make_device("serial")
    data = images.app("1.4.0").read_bytes()
    c = client(dev)
    try:
        c.image_erase(1)
        st = c.upload(data, window=1)
        assert st.match is True
        tail = len(data) - 100
        r = c.request(P.Op.WRITE, P.Group.IMAGE, 1, {"off": tail, "data": data[tail:]})
        assert r.get("off") == len(data) and r.get("match") is True, r
        # Any other offset, or a chunk that is not the last, still finds no session to go on with.
        r = c.request(P.Op.WRITE, P.Group.IMAGE, 1, {"off": tail - 100, "data": data[tail - 100:tail]})
        assert r.get("off") == 0, r
        assert state(dev)[1]["hash"] == parse(data).hash
    finally:
        c.t.close()



def test_bad_images_are_refused_with_image_group_codes(make_device: Callable[..., SimDevice], images: Images,
                                                       tmp_path: Path) -> None:
    dev = make_device("udp")
    good = (VECTORS / "images" / "app-1.2.3-signed.bin").read_bytes()
    sha = hashlib.sha256(good).digest()
    # wrong magic
    e = _upload_first(dev, {"off": 0, "len": len(good), "sha": sha, "data": b"\x00" * 64, "image": 1})
    assert (e.group, e.rc) == (1, 23)
    # larger than the slot
    e = _upload_first(dev, {"off": 0, "len": 16 << 20, "sha": sha, "data": good[:512], "image": 1})
    assert (e.group, e.rc) == (1, 30)
    # data past the declared length
    c = client(dev)
    r = c.request(P.Op.WRITE, P.Group.IMAGE, 1, {"off": 0, "len": len(good), "sha": sha, "data": good[:512]})
    off = r["off"]
    while len(good) - off > 1024:
        off = c.request(P.Op.WRITE, P.Group.IMAGE, 1, {"off": off, "data": good[off:off + 1024]})["off"]
    with pytest.raises(SMPError) as ei:
        c.request(P.Op.WRITE, P.Group.IMAGE, 1, {"off": off, "data": good[off:] + b"\xff" * 64})
    assert (ei.value.group, ei.value.rc) == (1, 31)
    c.image_erase(1)  # the uploader itself abandons its session
    c.t.close()
    # hash mismatch: the tampered vector has a valid header and TLVs but one flipped bit
    tampered = VECTORS / "images" / "app-1.2.3-tampered.bin"
    r2 = run_cli("smpmgr", *smpmgr_target(dev), "image", "upload", str(tampered), "--slot", "1")
    assert r2.returncode != 0
    assert 1 not in state(dev)  # nothing bootable was left in the slot
    c = client(dev)
    with pytest.raises(SMPError) as ei:
        c.upload(tampered.read_bytes())
    assert (ei.value.group, ei.value.rc) == (1, 24)
    c.t.close()
    # and the device still takes a good image afterwards
    smpmgr(dev, "image", "upload", str(VECTORS / "images" / "app-1.2.3-signed.bin"), "--slot", "1")
    assert state(dev)[1]["version"] == "1.2.3.4"


def test_noise_on_the_serial_line_is_ignored(make_device: Callable[..., SimDevice],
                                            request: pytest.FixtureRequest) -> None:
    dev = make_device("serial")
    port = dev.address[len("serial:"):]
    rnd = os.urandom(4096).replace(b"\x06", b"\x07")
    echo = P.encode_console(P.encode_request(P.Op.WRITE, 0, 0, 42, {"d": "still here"}))
    cut = echo[: len(echo) // 2]  # a frame cut mid-line, then a whole one
    # A board reads its console a byte at a time: the simulated Pico at its own speed took more
    # than 3 s over the 4 KiB of noise (`make hil-sim`), where the unix board takes milliseconds.
    with serial.Serial(port, timeout=30 if hil_mode(request.config) else 3) as s:
        s.write(rnd + b"\x06\x09AAAA\n" + cut + b"\n" + echo)
        got: list[bytes] = []
        dec = P.StreamDecoder(got.append)
        while not got:
            data = s.read(1)
            assert data, "device did not answer after noise"
            dec.feed(data + s.read(s.in_waiting))
    h, body = P.decode_frame(got[0])
    assert h.seq == 42 and body == {"r": "still here"}


def test_device_restart_keeps_flash_and_address(make_device: Callable[..., SimDevice], images: Images) -> None:
    dev = make_device("udp")
    addr = dev.address
    smpmgr(dev, "image", "upload", str(images.app("1.1.0")), "--slot", "1")
    gen = dev.ready_generation()
    dev.kill()
    dev.wait_ready(after=gen)
    assert dev.address == addr
    assert state(dev)[1]["version"] == "1.1.0"


def test_second_uploader_gets_ebusy_and_cannot_corrupt_the_first(make_device: Callable[..., SimDevice],
                                                                 images: Images) -> None:
    dev = make_device("udp")
    if dev.address.startswith("serial:"):
        pytest.skip("two uploaders need two origins; a board's one serial port is one origin")
    a_img = images.app("1.1.0").read_bytes()
    b_img = images.app("1.2.0").read_bytes()
    a, b = client(dev), client(dev)  # two UDP sockets: two clients
    r = a.request(P.Op.WRITE, P.Group.IMAGE, 1, {"off": 0, "len": len(a_img), "sha": hashlib.sha256(a_img).digest(),
                                                 "data": a_img[:1024], "image": 1})
    assert r["off"] == 1024
    with pytest.raises(SMPError) as e:
        b.upload(b_img)
    assert (e.value.group, e.value.rc) == (-1, 10)
    with pytest.raises(SMPError) as e:
        b.request(P.Op.WRITE, P.Group.IMAGE, 1, {"off": 1024, "data": b_img[1024:2048]})
    assert e.value.rc == 10
    with pytest.raises(SMPError) as e:
        b.image_erase(1)
    assert e.value.rc == 10
    st = a.upload(a_img)  # resumes at 1024 and completes, untouched by b
    assert st.resumed_from == 1024 and st.match is True
    assert state(dev)[1]["hash"] == parse(a_img).hash
    # The session is finished: now b may upload (it replaces the free slot).
    assert b.upload(b_img).match is True
    assert state(dev)[1]["hash"] == parse(b_img).hash
    a.t.close()
    b.t.close()


def test_compressed_upload_inflates_on_the_device(make_device: Callable[..., SimDevice], images: Images) -> None:
    import zlib

    dev = make_device("serial")
    data = images.app("1.8.0").read_bytes()
    t = from_address(port=dev.address)
    t.open()
    c = SMPClient(t)
    c.connect()
    assert c.can_deflate
    st = c.upload(data, compress=True)
    assert st.match is True and st.wire_bytes < len(data) * 0.9
    assert state(dev)[1]["hash"] == parse(data).hash
    # A block that does not inflate to its declared size is refused, nothing of
    # it written (a block that inflates to wrong bytes fails the image hash).
    c.image_erase(1)
    z = zlib.compressobj(9, zlib.DEFLATED, -9)
    block = (z.compress(data[:1024]) + z.flush())[:-40]
    body = {"off": 0, "len": len(data), "sha": hashlib.sha256(data).digest(), "image": 1, "rlen": 1024,
            "data": bytes(block)}
    with pytest.raises(SMPError) as e:
        c.request(P.Op.WRITE, P.Group.METEROTA, 3, body)
    assert e.value.rc == 3
    assert c.info()["upload"]["state"] == 0  # no session was opened
    assert 1 not in {e["slot"] for e in c.image_state()}
    t.close()
