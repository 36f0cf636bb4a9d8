"""Signed images and anti-rollback, enforced by the device under MicroPython."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import VECTORS, port_of, run_cli, sim_client
from meterota import image as img
from meterota.boards import unix_slot_size
from meterota.client import SMPClient, SMPError
from meterota.image import parse
from meterota.lab.sim import SimDevice
from meterota.store import Store

IMAGES = VECTORS / "images"


@pytest.fixture(scope="module")
def test_pubkey(image_vectors: dict[str, Any]) -> str:
    return str(image_vectors["test_public_key_raw_hex"])


def client(dev: SimDevice) -> SMPClient:
    return sim_client(dev, timeout=2.0)


def upload_err(dev: SimDevice, data: bytes) -> tuple[int, int]:
    c = client(dev)
    try:
        with pytest.raises(SMPError) as e:
            c.upload(data)
        return e.value.group, e.value.rc
    finally:
        c.t.close()


def slots(dev: SimDevice) -> dict[int, dict[str, Any]]:
    c = client(dev)
    try:
        return {e["slot"]: e for e in c.image_state()}
    finally:
        c.t.close()


def test_signed_only_device_refuses_unsigned_wrong_key_and_tampered(make_device: Callable[..., SimDevice],
                                                                     test_pubkey: str) -> None:
    dev = make_device("udp", extra={"pubkey": test_pubkey})
    assert upload_err(dev, (IMAGES / "app-1.2.3-unsigned.bin").read_bytes()) == (1, 32)
    assert 1 not in slots(dev)
    assert upload_err(dev, (IMAGES / "app-1.2.3-otherkey.bin").read_bytes()) == (1, 32)
    assert 1 not in slots(dev)
    assert upload_err(dev, (IMAGES / "app-1.2.3-tampered.bin").read_bytes()) == (1, 24)
    assert 1 not in slots(dev)
    good = (IMAGES / "app-1.2.3-signed.bin").read_bytes()
    c = client(dev)
    assert c.upload(good).match is True
    images = c.image_test(parse(good).hash)
    c.t.close()
    assert any(e["slot"] == 1 and e.get("pending") for e in images)


def test_signed_bundle_upgrades_end_to_end(make_device: Callable[..., SimDevice], test_pubkey: str,
                                           tmp_path: Path) -> None:
    dev = make_device("serial", extra={"pubkey": test_pubkey})
    db = tmp_path / "r.db"
    with Store(db) as st:
        st.set_key(dev.device_id, dev.key)
    signed = tmp_path / "signed.bin"
    signed.write_bytes(img.build_image(None, "1.5.0", slot_size=unix_slot_size(), key=IMAGES / "test-ed25519.pem"))
    r = run_cli("meterota", "--db", str(db), "--json", "upgrade", *port_of(dev), str(signed), check=True)
    assert json.loads(r.stdout)["result"] == "OK"
    # An image signed with another key is refused with a clear line.
    other = tmp_path / "other.bin"
    other.write_bytes(img.build_image(None, "1.6.0", slot_size=unix_slot_size(), key=IMAGES / "other-ed25519.pem"))
    r = run_cli("meterota", "--db", str(db), "upgrade", *port_of(dev), str(other))
    assert r.returncode == 4 and "image refused (signature or policy)" in r.stderr


def test_anti_rollback_by_version_and_security_counter(make_device: Callable[..., SimDevice],
                                                       tmp_path: Path) -> None:
    dev = make_device("udp")
    if getattr(dev, "allows_downgrade", False):
        pytest.skip("the HIL board allows downgrades (each test starts from the factory 1.0.0)")
    db = tmp_path / "r.db"
    with Store(db) as st:
        st.set_key(dev.device_id, dev.key)
    v = tmp_path / "v.bin"
    v.write_bytes(img.sign(img.build_bundle(img.collect_files(None)), "1.4.0", slot_size=unix_slot_size(),
                           security_counter="5"))
    run_cli("meterota", "--db", str(db), "upgrade", *port_of(dev), str(v), check=True)
    # Older version: refused by the device itself (the host pre-check is bypassed with --allow-downgrade).
    old = (IMAGES / "app-1.0.0-signed.bin").read_bytes()
    assert upload_err(dev, old) == (1, 27)
    # Newer version but a lower security counter: refused once the protected TLVs are in.
    low = tmp_path / "low.bin"
    low.write_bytes(img.sign(img.build_bundle(img.collect_files(None)), "1.5.0", slot_size=unix_slot_size(),
                             security_counter="3"))
    assert upload_err(dev, low.read_bytes()) == (1, 27)
    assert 1 not in slots(dev) or slots(dev)[1]["version"] != "1.5.0"
    # The SMP `upgrade` flag: equal versions are refused when it is set.
    same = (IMAGES / "app-2.0.0-seccnt5.bin").read_bytes()
    c = client(dev)
    assert c.upload(same, upgrade=True).match is True  # 2.0.0 > 1.4.0, counter 5 >= 5
    c.image_erase(1)
    with pytest.raises(SMPError) as e:
        c.upload(v.read_bytes(), upgrade=True)  # 1.4.0 is not newer than the running 1.4.0
    assert e.value.rc == 27
    c.t.close()


def test_downgrade_allowed_by_configuration(make_device: Callable[..., SimDevice], tmp_path: Path) -> None:
    dev = make_device("udp", extra={"allow_downgrade": True})
    db = tmp_path / "r.db"
    with Store(db) as st:
        st.set_key(dev.device_id, dev.key)
    newer = tmp_path / "n.bin"
    newer.write_bytes(img.build_image(None, "3.0.0", slot_size=unix_slot_size()))
    run_cli("meterota", "--db", str(db), "upgrade", *port_of(dev), str(newer), check=True)
    c = client(dev)
    assert c.upload((IMAGES / "app-1.0.0-signed.bin").read_bytes()).match is True
    c.t.close()
    assert slots(dev)[1]["version"] == "1.0.0"
