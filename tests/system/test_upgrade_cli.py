"""`meterota upgrade` and friends, as a user runs them, against simulated devices."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import BIN, Images, port_of, run_cli, smpmgr_target
from meterota import protocol as P
from meterota.confirm import verify
from meterota.errors import ConfirmationError
from meterota.image import parse
from meterota.lab.sim import LinkShaper, SimDevice
from meterota.store import Store


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "records.db"


def meterota(db: Path, *args: str, check: bool | None = None, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("meterota", "--db", str(db), *args, check=check, timeout=timeout)


def register(db: Path, dev: SimDevice) -> None:
    with Store(db) as st:
        st.set_key(dev.device_id, dev.key)


def rows(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    return [dict(r) for r in con.execute("SELECT * FROM upgrades ORDER BY id")]


@pytest.mark.parametrize("transport", ["serial", "udp"])
def test_full_upgrade_ok_with_verified_confirmation(make_device: Callable[..., SimDevice], images: Images,
                                                    db: Path, transport: str) -> None:
    dev = make_device(transport)
    register(db, dev)
    app = images.app("1.1.0")
    r = meterota(db, "--json", "upgrade", *port_of(dev), str(app), check=True)
    doc = json.loads(r.stdout)
    h = parse(app.read_bytes()).hash
    assert doc["result"] == "OK" and doc["to_version"] == "1.1.0+0" and doc["from_version"] == "1.0.0+0"
    conf = doc["confirmation"]
    assert conf["result"] == "OK" and conf["hash"] == h.hex() and conf["version"] == "1.1.0+0"
    # The record is authentic: recompute it from the raw bytes with the device key.
    c = verify(bytes.fromhex(conf["record"]), bytes.fromhex(conf["mac"]), dev.key, image_hash=h)
    assert c.previous_version == "1.0.0+0"
    (row,) = rows(db)
    assert row["result"] == "OK" and row["verified"] == 1 and row["image_hash"] == h.hex()
    assert bytes(row["record"]) == bytes.fromhex(conf["record"])
    # Running it again is a no-op that still succeeds.
    again = json.loads(meterota(db, "--json", "upgrade", *port_of(dev), str(app), check=True).stdout)
    assert again["skipped_upload"] and again["result"] == "OK"
    # The human view shows the new image confirmed.
    out = meterota(db, "images", *port_of(dev), check=True).stdout
    assert "1.1.0" in out and "active confirmed" in out


def test_killed_host_resumes_from_the_device_offset(make_device: Callable[..., SimDevice], images: Images,
                                                    db: Path) -> None:
    # A 20 kB/s line (a slow optical probe) makes the upload last a few seconds.
    dev = make_device("serial", bytes_per_second=20000)
    register(db, dev)
    app = images.app("1.5.0")
    proc = subprocess.Popen([str(BIN / "meterota"), "--db", str(db), "upgrade", *port_of(dev), str(app)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "(30%)" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    doc = json.loads(meterota(db, "--json", "upgrade", *port_of(dev), str(app), check=True).stdout)
    assert doc["result"] == "OK"
    assert doc["upload"]["resumed_from"] >= len(app.read_bytes()) * 3 // 10 - 4096


def test_trial_boot_failure_is_ko_with_the_device_reason(make_device: Callable[..., SimDevice], images: Images,
                                                         db: Path) -> None:
    dev = make_device("udp")
    register(db, dev)
    bad = images.app("2.0.0", app_py="import nonexistent_driver\n")
    r = meterota(db, "--json", "upgrade", *port_of(dev), str(bad))
    assert r.returncode == 5, r.stderr
    assert r.stderr.count("\n") >= 1 and "Traceback" not in r.stderr
    assert "KO" in r.stderr and "nonexistent_driver" in r.stderr
    (row,) = rows(db)
    assert row["result"] == "KO" and row["verified"] == 1 and "nonexistent_driver" in row["reason"]
    rec = verify(bytes(row["record"]), bytes(row["mac"]), dev.key)
    assert rec.result == "KO" and rec.image_hash == parse(bad.read_bytes()).hash


def test_device_that_never_comes_back_is_a_clear_failure_and_a_ko_record(
        make_device: Callable[..., SimDevice], images: Images, db: Path) -> None:
    dev = make_device("udp")
    register(db, dev)
    hang = images.app("2.1.0", app_py="while True:\n    pass\n")
    r = meterota(db, "upgrade", *port_of(dev), str(hang), "--reset-timeout", "3")
    assert r.returncode == 3
    assert "no answer after reset" in r.stderr and "Traceback" not in r.stderr
    (row,) = rows(db)
    assert row["result"] == "KO" and "no answer after reset" in row["reason"]


class TamperConfirmation(LinkShaper):
    """A man in the middle that rewrites the confirmation record's result and
    re-frames the reply with a correct CRC, as a real attacker would."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.dec = P.StreamDecoder(self.frames.append)
        self.tampered = 0

    def to_host(self, data: bytes) -> bytes:
        self.dec.feed(data)
        out = b""
        while self.frames:
            f = self.frames.pop(0)
            h, body = P.decode_frame(f)
            if h.group == 64 and h.cmd == 1 and "rec" in body:
                body["rec"] = body["rec"].replace(b"KO", b"OK")
                self.tampered += 1
                import cbor2

                payload = cbor2.dumps(body, canonical=True)
                f = P.Header(h.op, h.version, 0, len(payload), h.group, h.seq, h.cmd).pack() + payload
            out += P.encode_console(f)
        return out


def test_tampered_confirmation_record_is_rejected(make_device: Callable[..., SimDevice], images: Images,
                                                  db: Path) -> None:
    shaper = TamperConfirmation()
    dev = make_device("serial", shaper=shaper)
    register(db, dev)
    bad = images.app("2.2.0", app_py="raise OSError(5)\n")
    r = meterota(db, "upgrade", "--console", *port_of(dev), str(bad))
    assert shaper.tampered >= 1
    assert r.returncode == 6, r.stderr
    assert "MAC does not verify" in r.stderr
    # And the check itself: one flipped bit anywhere fails.
    good = bytes.fromhex("a0")
    with pytest.raises(ConfirmationError):
        verify(good, b"\x00" * 32, dev.key)


def test_smpmgr_and_meterota_one_after_the_other(make_device: Callable[..., SimDevice], images: Images,
                                                 db: Path) -> None:
    dev = make_device("serial")
    register(db, dev)
    meterota(db, "upgrade", *port_of(dev), str(images.app("1.1.0")), check=True)
    gen = dev.ready_generation()
    run_cli("smpmgr", *smpmgr_target(dev), "upgrade", "--slot", "1", str(images.app("1.2.0")), check=True)
    dev.wait_ready(after=gen)
    run_cli("smpmgr", *smpmgr_target(dev), "image", "state-write", "--confirm", check=True)
    r = json.loads(meterota(db, "--json", "upgrade", *port_of(dev), str(images.app("1.3.0")), check=True).stdout)
    assert r["from_version"] == "1.2.0+0" and r["result"] == "OK"
    out = run_cli("smpmgr", *smpmgr_target(dev), "image", "state-read", check=True).stdout
    assert "1.3.0" in out


def test_user_errors_are_one_line_with_documented_exit_codes(make_device: Callable[..., SimDevice],
                                                             images: Images, db: Path, tmp_path: Path) -> None:
    app = images.app("1.1.0")

    def one_line(r: subprocess.CompletedProcess[str], code: int, text: str) -> None:
        assert r.returncode == code, (r.returncode, r.stderr)
        errs = [x for x in r.stderr.splitlines() if x.startswith("meterota: error:")]
        assert len(errs) == 1 and text in errs[0] and "Traceback" not in r.stderr, r.stderr

    one_line(meterota(db, "upgrade", "--port", "/dev/ttyNOPE", str(app)), 3, "cannot open serial port")
    # A UDP port that takes datagrams and never answers (a fixed address may be another run's device).
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        where = f"127.0.0.1:{silent.getsockname()[1]}"
        one_line(meterota(db, "info", "--udp", where, "--timeout", "0.3", "--retries", "0"), 3, "no reply")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    dev = make_device("udp")
    register(db, dev)
    one_line(meterota(db, "upgrade", *port_of(dev), str(junk)), 8, "not an MCUboot image")
    one_line(meterota(db, "upgrade", *port_of(dev), str(tmp_path / "missing.bin")), 8, "cannot read image")
    # In HIL mode the device is an rp2 or esp32 board: the images follow it.
    board = getattr(dev, "board", "unix")
    big_dir = tmp_path / "big"
    big_dir.mkdir()
    (big_dir / "blob.bin").write_bytes(os.urandom(600 * 1024))
    big = tmp_path / "big.bin"
    meterota(db, "image", "build", str(big_dir), "--version", "9.0.0", "--slot-size", "0x100000", "--board", board,
             "-o", str(big), check=True)
    one_line(meterota(db, "upgrade", *port_of(dev), str(big)), 4, "too large")
    other = "rp2" if board == "esp32" else "esp32"
    esp = tmp_path / "other.bin"
    meterota(db, "image", "build", "--version", "5.0.0", "--board", other, "-o", str(esp), check=True)
    one_line(meterota(db, "upgrade", *port_of(dev), str(esp)), 4, f"built for board {other}")
    # An image for this board carries the board in a protected TLV, which the device parses.
    mine = tmp_path / "mine.bin"
    meterota(db, "image", "build", "--version", "1.6.0", "--board", board, "-o", str(mine), check=True)
    meterota(db, "upgrade", *port_of(dev), str(mine), check=True)
    one_line(meterota(db, "upgrade", *port_of(dev), str(app)), 4, "older than the running")
    one_line(meterota(db, "upgrade", *port_of(dev), str(images.app("1.7.0")), "--key", "00" * 32), 6,
             "MAC does not verify")


def test_image_build_and_info(tmp_path: Path, db: Path) -> None:
    key = tmp_path / "k.pem"
    meterota(db, "image", "keygen", "-o", str(key), check=True)
    appd = tmp_path / "app"
    appd.mkdir()
    (appd / "app.py").write_text("def selftest():\n    return True\n")
    out = tmp_path / "a.bin"
    meterota(db, "image", "build", str(appd), "--version", "3.1.4+15", "--key", str(key), "-o", str(out), check=True)
    doc = json.loads(meterota(db, "--json", "image", "info", str(out), "--key", str(key), check=True).stdout)
    assert doc["version"] == "3.1.4+15" and doc["hash_ok"] and doc["signature"] == "ED25519"
    assert doc["signature_ok"] is True
    other = tmp_path / "o.pem"
    meterota(db, "image", "keygen", "-o", str(other), check=True)
    r = meterota(db, "image", "info", str(out), "--key", str(other))
    assert r.returncode == 8 and "DOES NOT VERIFY" in r.stdout
