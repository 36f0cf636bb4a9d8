"""ESP32 native firmware A/B over SMP (boards/esp32/fw_image.py), on the unix
MicroPython: the real ESP32 board code, grp_image and the receiver, with fake
`esp32` (Partition over the NOR flash model, otadata, a rollback bootloader)
and `machine` (WDT, reset) modules from tests/device/esp32_fakes.

The host side makes the images as `meterota image build --firmware` does
(imgtool sign of a fake ESP app image: magic 0xE9, app descriptor 0xABCD5432);
the device driver (esp32_fakes/fwdrv.py) uploads them with the standard image
commands (first chunk of 87 bytes, as smpmgr) and prints every reply frame,
which is decoded here and checked against smp's own models (as smpclient
parses them)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any, Iterator

import cbor2
import pytest
from smp import image_management as smpimg

from conftest import MICROPYTHON, REPO, run_cli, run_mp
from meterota import image as img
from meterota.confirm import verify

FAKES = Path(__file__).with_name("esp32_fakes")
MP_PATH = ":".join(str(p) for p in (REPO / "boards" / "esp32", FAKES, REPO / "boards" / "unix", REPO / "device"))
SECTOR = 4096
KEY = bytes(range(32))
# The fake partition table: (label, type, subtype, offset, size); ota_N small to keep it fast.
OTA_SIZE = 0x18000
TABLE = [("mtr_meta", 1, 0x06, 0x0, 0x4000), ("mtr_a", 1, 0x06, 0x4000, 0x20000),
         ("mtr_b", 1, 0x06, 0x24000, 0x20000), ("ota_0", 0, 0x10, 0x44000, OTA_SIZE),
         ("ota_1", 0, 0x11, 0x5C000, OTA_SIZE)]
NO_OTA = [t for t in TABLE if not t[0].startswith("ota")] + [("factory", 0, 0x00, 0x44000, 0x30000)]
PARTS = {t[0]: (t[3], t[4]) for t in TABLE}

# image-group rc (v2 err) and SMP rc
INVALID_HASH, INVALID_IMAGE_VECTOR_TABLE, IMAGE_CONFIRMATION_DENIED, NO_FREE_SLOT = 24, 29, 32, 9
ENOTSUP = 8


def app_image(size: int, version: str = "v1.29.0", chip: int = 0, seed: int = 1) -> bytes:
    """A bare ESP-IDF app image as far as the checks go: esp_image_header_t,
    one segment header, esp_app_desc_t (magic, version, app_elf_sha256)."""
    hdr = bytes([0xE9, 3, 2, 0x20]) + struct.pack("<I", 0x40080000) + bytes([0xEE, 0, 0, 0])
    hdr += struct.pack("<HBHH", chip, 0, 0, 0xFFFF) + bytes(4) + b"\x01"
    seg = struct.pack("<II", 0x3F400020, 256)
    desc = (struct.pack("<II", 0xABCD5432, 0) + bytes(8) + version.encode().ljust(32, b"\0")
            + b"micropython".ljust(32, b"\0") + bytes(32) + b"v5.2.2".ljust(32, b"\0") + elf_sha(version, seed))
    body = hdr + seg + desc
    return body + random.Random(seed).randbytes(size - len(body))


def elf_sha(version: str, seed: int = 1) -> bytes:
    return hashlib.sha256(f"{version}/{seed}".encode()).digest()


def combined_image(app: bytes) -> bytes:
    """firmware.bin as the ESP32 build writes it from flash offset 0x1000:
    bootloader, partition table at file offset 0x7000, the app at 0xF000."""
    boot = bytearray(b"\xff" * (0x10000 - 0x1000))
    boot[:24] = bytes([0xE9, 3, 2, 0x20]) + bytes(20)
    boot[24:32] = struct.pack("<II", 0x3FFF0030, 0x100)
    boot[0x7000:0x7002] = b"\xaa\x50"
    return bytes(boot) + app


class Images:
    """The images of these tests, built once (imgtool in-process)."""

    def __init__(self, d: Path):
        self.d = d
        self.key = d / "signing.pem"
        img.keygen(self.key)
        self.factory_fw = app_image(30000, "v1.24.1", seed=7)
        self.app = app_image(40000, "v1.29.0")
        self.fw = self._save("fw.bin", img.build_firmware_image(self.app, "1.29.0", slot_size=OTA_SIZE))
        self.fw_signed = self._save("fw-signed.bin", img.build_firmware_image(self.app, "1.29.0", slot_size=OTA_SIZE,
                                                                                key=self.key))
        self.app2 = app_image(20000, "v1.30.0", seed=3)
        self.fw2 = self._save("fw2.bin", img.build_firmware_image(self.app2, "1.30.0", slot_size=OTA_SIZE))
        # What the host refuses to build, made with imgtool directly.
        self.combined = self._save("combined.bin", img.sign(combined_image(self.app2), "1.30.0", slot_size=OTA_SIZE,
                                                             board="esp32", kind=img.KIND_FIRMWARE))
        bad = bytearray(self.fw.read_bytes())
        bad[img.HEADER_SIZE + 5000] ^= 0x01  # one payload bit: the SHA256 TLV no longer matches
        self.bad_hash = self._save("fw-badhash.bin", bytes(bad))
        # An application bundle image (MCUboot, small) for slot A.
        self.bundle = img.sign(bytes(3000), "1.0.0", slot_size=0x20000)
        self.bundle2 = self._save("bundle2.bin", img.sign(bytes(3000), "1.1.0", slot_size=0x20000))

    def _save(self, name: str, data: bytes) -> Path:
        p = self.d / name
        p.write_bytes(data)
        return p

    def hash(self, p: Path) -> bytes:
        return img.parse(p.read_bytes()).hash


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    return Images(tmp_path_factory.mktemp("fw-images"))


class Run:
    """One device session: flash file, config, driver script; replies decoded."""

    def __init__(self, tmp: Path, images: Images, table: list[tuple[str, int, int, int, int]] = TABLE,
                 **config: Any):
        self.tmp = tmp
        self.images = images
        self.table = table
        flash = bytearray(b"\xff" * max(t[3] + t[4] for t in table))
        a = PARTS["mtr_a"][0]
        flash[a:a + len(images.bundle)] = images.bundle
        o0 = [t for t in table if t[1] == 0][0][3]
        flash[o0:o0 + len(images.factory_fw)] = images.factory_fw
        (tmp / "flash.bin").write_bytes(flash)
        cfg = {"id": "meter-esp", "key": KEY.hex(), "serial": "", "grace_ms": 0, **config}
        (tmp / "config.json").write_text(json.dumps(cfg))
        self.lines: list[dict[str, Any]] = []

    def run(self, body: str, rollback: bool = True, boot: str | None = None) -> list[dict[str, Any]]:
        first = boot or [t for t in self.table if t[1] == 0][0][0]
        code = (f"import fwdrv, esp32\nesp32.setup('flash.bin', {self.table!r}, {first!r}, rollback={rollback})\n"
                "d = fwdrv.Dev()\nd.boot()\nfwdrv.log('log0')\n" + body + "\nfwdrv.log('end')\n")
        p = run_mp(self.tmp, code, env={"MICROPYPATH": MP_PATH})
        self.lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
        return self.lines

    def get(self, tag: str) -> dict[str, Any]:
        found = [x for x in self.lines if x["tag"] == tag]
        assert len(found) == 1, (tag, self.lines)
        return found[0]

    def frame(self, tag: str) -> bytes:
        return bytes.fromhex(self.get(tag)["frame"])

    def body(self, tag: str) -> Any:
        return cbor2.loads(self.frame(tag)[8:])

    def state(self, tag: str = "state") -> dict[tuple[int, int], dict[str, Any]]:
        """The state read reply, validated as smpclient does, by (image, slot)."""
        f = self.frame(tag)
        model = smpimg.ImageStatesWriteResponse if tag.startswith("state_write") else smpimg.ImageStatesReadResponse
        model.loads(f)  # raises on any key smpclient does not know
        return {(e.get("image", 0), e["slot"]): e for e in cbor2.loads(f[8:])["images"]}

    def log(self, tag: str) -> list[list[Any]]:
        return [list(e) for e in self.get(tag)["log"]]

    def partition(self, label: str) -> bytes:
        off, size = PARTS[label]
        return (self.tmp / "flash.bin").read_bytes()[off:off + size]

    def record(self, tag: str = "record") -> Any:
        b = self.body(tag)
        return verify(bytes(b["rec"]), bytes(b["mac"]), KEY, device_id="meter-esp")


def test_upload_lands_in_the_next_ota_partition(tmp_path: Path, images: Images) -> None:
    r = Run(tmp_path, images)
    r.run(f"d.state('before')\nd.upload({str(images.fw)!r})\nd.state('after')\nfwdrv.log('after_log')")
    before = r.state("before")
    # The factory firmware (flashed, not uploaded): its app descriptor's version and ELF SHA-256.
    assert before[(1, 0)] == {"image": 1, "slot": 0, "version": "1.24.1", "hash": elf_sha("v1.24.1", 7),
                              "bootable": True, "active": True, "confirmed": True}
    assert (1, 1) not in before
    assert before[(0, 0)]["active"] and before[(0, 0)]["image"] == 0  # the bundle, now tagged image 0
    assert r.get("upload")["reply"] == {"off": images.fw.stat().st_size, "match": True}
    # Byte-exact app at the start of ota_1; header and TLVs in its last sector.
    ota1 = r.partition("ota_1")
    assert ota1[:len(images.app)] == images.app
    assert ota1[len(images.app):OTA_SIZE - SECTOR] == b"\xff" * (OTA_SIZE - SECTOR - len(images.app))
    data = images.fw.read_bytes()
    info = img.parse(data)
    trailer = ota1[OTA_SIZE - SECTOR:]
    tlvs = data[info.hdr_size + info.img_size:]
    assert trailer[:info.hdr_size] == data[:info.hdr_size]
    assert trailer[info.hdr_size:info.hdr_size + len(tlvs)] == tlvs
    after = r.state("after")
    assert after[(1, 1)] == {"image": 1, "slot": 1, "version": "1.29.0", "hash": info.hash, "bootable": True}
    assert after[(1, 0)]["hash"] == elf_sha("v1.24.1", 7)
    assert r.partition("ota_0")[:len(images.factory_fw)] == images.factory_fw
    assert ["mark_valid", "ota_0"] in r.log("log0")  # a confirmed firmware keeps IDF from rolling back
    assert not [e for e in r.log("after_log") if e[0] == "set_boot"], "set_boot before any state write"


def test_test_trial_confirm(tmp_path: Path, images: Images) -> None:
    r = Run(tmp_path, images)
    h = images.hash(images.fw)
    r.run(f"""
d.upload({str(images.fw)!r})
fwdrv.log('uploaded')
d.state_write({{"hash": {h!r}}})
fwdrv.log('tested')
d.boot()
fwdrv.log('trial_log')
d.state('trial')
d.state_write({{"confirm": True}}, 'state_write_confirm')
fwdrv.log('confirmed')
d.record()
d.boot()
d.state('again')
""")
    assert not [e for e in r.log("uploaded") if e[0] in ("set_boot", "reset")]
    assert r.log("tested") == [["set_boot", "ota_1"]]
    pending = r.state("state_write")
    assert pending[(1, 1)]["hash"] == h and pending[(1, 1)]["pending"] and "permanent" not in pending[(1, 1)]
    assert pending[(1, 0)]["confirmed"]
    boots = [x["running"] for x in r.lines if x["tag"] == "boot"]
    assert boots == ["ota_0", "ota_1", "ota_1"]
    # The trial: the watchdog armed, nothing marked valid yet; the old firmware is the fallback.
    trial_log = r.log("trial_log")
    assert ["wdt", 30000] in trial_log and not [e for e in trial_log if e[0] == "mark_valid"]
    st = r.state("trial")
    assert st[(1, 0)]["hash"] == h and st[(1, 0)]["active"] and "confirmed" not in st[(1, 0)]
    assert st[(1, 1)]["version"] == "1.24.1" and st[(1, 1)]["confirmed"]
    assert r.log("confirmed") == [["mark_valid", "ota_1"]]
    assert r.state("state_write_confirm")[(1, 0)]["confirmed"]
    rec = r.record()
    assert (rec.result, rec.image_hash, rec.version, rec.previous_version) == ("OK", h, "1.29.0+0", "1.24.1+0")
    again = r.state("again")
    assert again[(1, 0)]["hash"] == h and again[(1, 0)]["confirmed"]


def test_reset_during_the_trial_rolls_back(tmp_path: Path, images: Images) -> None:
    h = images.hash(images.fw)
    script = f"""
d.upload({str(images.fw)!r})
d.state_write({{"hash": {h!r}}})
d.boot()
d.boot()
d.state()
d.record()
"""
    for rollback in (True, False):  # the bootloader rolls back, or (without rollback support) fw_image does
        r = Run(tmp_path, images)
        r.run(script, rollback=rollback)
        boots = [x["running"] for x in r.lines if x["tag"] == "boot"]
        assert boots == ["ota_0", "ota_1", "ota_0"], (rollback, boots)
        st = r.state()
        assert st[(1, 0)]["version"] == "1.24.1" and st[(1, 0)]["confirmed"], rollback
        assert st[(1, 1)]["hash"] == h and "pending" not in st[(1, 1)], rollback
        rec = r.record()
        assert rec.result == "KO" and rec.image_hash == h, rollback
        assert "not confirmed before reset" in rec.reason or "reset before confirm" in rec.reason, rec.reason
        assert not [e for e in r.log("end") if e == ["mark_valid", "ota_1"]]


def test_self_confirm_marks_valid_only_after_the_self_test(tmp_path: Path, images: Images) -> None:
    h = images.hash(images.fw)
    for ok in (True, False):
        (tmp_path / "app.py").write_text(f"def selftest():\n    return {ok}\n")
        r = Run(tmp_path, images, self_confirm=True)
        r.run(f"""
import app
d.upload({str(images.fw)!r})
d.state_write({{"hash": {h!r}}})
fwdrv.log('tested')
d.boot()
d.record()
d.state()
""")
        log = r.log("end")
        if ok:
            assert log.index(["wdt", 30000]) < log.index(["mark_valid", "ota_1"])
            assert r.record().result == "OK" and r.record().reason == "firmware self-test passed"
            assert r.state()[(1, 0)]["hash"] == h
        else:
            assert ["mark_valid", "ota_1"] not in log
            assert ["set_boot", "ota_0"] in log and ["reset", "ota_1"] in log
            assert [x["running"] for x in r.lines if x["tag"] == "boot"] == ["ota_0", "ota_0"]
            rec = r.record()
            assert rec.result == "KO" and "self-test returned False" in rec.reason
    (tmp_path / "app.py").unlink()


def test_permanent_switch_without_trial(tmp_path: Path, images: Images) -> None:
    h = images.hash(images.fw)
    r = Run(tmp_path, images)
    r.run(f"""
d.upload({str(images.fw)!r})
d.state_write({{"hash": {h!r}, "confirm": True}})
fwdrv.log('tested')
d.boot()
d.record()
d.state()
""")
    st = r.state("state_write")[(1, 1)]
    assert st["pending"] and st["permanent"]
    assert r.log("end")[:1] == [["mark_valid", "ota_1"]] and ["wdt", 30000] not in r.log("end")
    rec = r.record()
    assert (rec.result, rec.reason, rec.image_hash) == ("OK", "firmware made permanent", h)
    assert r.state()[(1, 0)]["confirmed"]


def test_app_failing_on_the_new_firmware_rolls_back(tmp_path: Path, images: Images) -> None:
    h = images.hash(images.fw)
    r = Run(tmp_path, images)
    r.run(f"""
d.upload({str(images.fw)!r})
d.state_write({{"hash": {h!r}}})
d.boot(recovery=True)
d.record()
""")
    assert [x["running"] for x in r.lines if x["tag"] == "boot"] == ["ota_0", "ota_0"]
    rec = r.record()
    assert rec.result == "KO" and "application did not start" in rec.reason


def test_combined_firmware_bin_is_refused_before_anything_is_written(tmp_path: Path, images: Images) -> None:
    r = Run(tmp_path, images)
    r.run(f"""
d.upload({str(images.fw2)!r}, tag='good')
d.state('good_state')
""")
    ota1 = r.partition("ota_1")
    good = r.state("good_state")[(1, 1)]
    r.run(f"d.upload({str(images.combined)!r}, tag='combined')\nd.state()\nfwdrv.log('after')")
    assert r.get("combined")["reply"] == {"err": {"group": 1, "rc": INVALID_IMAGE_VECTOR_TABLE}}
    assert r.partition("ota_1") == ota1, "the partition was touched"
    assert r.state()[(1, 1)] == good  # the image that was there is still there
    assert not [e for e in r.log("after") if e[0] == "set_boot"]


def test_wrong_hash_is_refused(tmp_path: Path, images: Images) -> None:
    r = Run(tmp_path, images)
    r.run(f"d.upload({str(images.bad_hash)!r})\nd.state()\nd.state_write({{'hash': {images.hash(images.bad_hash)!r}}})")
    assert r.get("upload")["reply"] == {"err": {"group": 1, "rc": INVALID_HASH}}
    assert (1, 1) not in r.state()
    assert r.body("state_write") == {"err": {"group": 1, "rc": 8}}  # HASH_NOT_FOUND
    assert r.partition("ota_1")[OTA_SIZE - SECTOR:] == b"\xff" * SECTOR


def test_signed_only_device(tmp_path: Path, images: Images) -> None:
    pub = img.public_key_raw(images.key).hex()
    r = Run(tmp_path, images, pubkey=pub)
    h = images.hash(images.fw_signed)
    r.run(f"""
d.upload({str(images.fw)!r}, tag='unsigned')
d.upload({str(images.fw_signed)!r}, tag='signed')
d.state_write({{"hash": {h!r}}})
""")
    assert r.get("unsigned")["reply"] == {"err": {"group": 1, "rc": IMAGE_CONFIRMATION_DENIED}}
    assert r.get("signed")["reply"]["match"] is True
    assert r.state("state_write")[(1, 1)]["pending"]


def test_bundle_and_firmware_go_to_their_own_image_numbers(tmp_path: Path, images: Images) -> None:
    r = Run(tmp_path, images)
    r.run(f"""
d.upload({str(images.fw)!r}, image=1, tag='fw_as_bundle')
d.state('state1')
d.upload({str(images.fw)!r}, image=4, tag='fw_4')
d.erase(3)
d.state('erased')
d.erase(2, tag='erase_running')
""")
    # A firmware image in an application slot is refused once its KIND TLV is read.
    assert r.get("fw_as_bundle")["reply"] == {"err": {"group": 1, "rc": INVALID_IMAGE_VECTOR_TABLE}}
    assert (0, 1) not in r.state("state1")
    assert r.get("fw_4")["reply"]["match"] is True  # 4 = image 1's other slot number: the same place
    assert (1, 1) not in r.state("erased")
    assert r.body("erase_running") == {"err": {"group": 1, "rc": NO_FREE_SLOT}}


def test_the_firmware_code_is_loaded_only_for_firmware_requests(tmp_path: Path, images: Images) -> None:
    """fw_image.py and firmware_ab.py (9.5 KiB of a 32-bit heap with their data) are not
    resident while a bundle is uploaded: a state read loads fw_state.py alone and lets it go, a
    firmware upload keeps them until its session ends, and the images they verified
    outlive the load (the state reads agree)."""
    r = Run(tmp_path, images)
    r.run(f"""
import sys, hashlib
def loaded(tag):
    fwdrv.out(tag, mods=sorted(m for m in ("fw_image", "fw_state", "firmware_ab") if m in sys.modules),
              loads=d.ctx.board.fw.loads)
loaded('booted')
fwdrv.out('boot_loads', n=d.ctx.board.fw.loads)
d.state('s1')
loaded('after_state')
data = open({str(images.fw)!r}, 'rb').read()
d.call(2, 1, 1, {{"off": 0, "len": len(data), "sha": hashlib.sha256(data).digest(), "image": 3,
                 "data": data[:512]}}, 'first')
loaded('uploading')
d.state('s2')
loaded('state_while_uploading')
d.erase(3, tag='cancel')
loaded('cancelled')
d.state('s3')
d.state_write({{"confirm": True}}, tag='confirm_bundle')
loaded('confirmed')
""")
    assert r.get("booted")["mods"] == [] and r.get("after_state")["mods"] == []
    # One load at boot, for the boot check and the trial flag: board.ready(), when the whole
    # receiver is resident, loads nothing more (on a tight heap that load failed the boot).
    assert r.get("boot_loads")["n"] == 1
    # A state read needs fw_state.py alone (the partitions' cached images and flags).
    assert r.get("after_state")["loads"] == 1
    assert r.body("first") == {"off": 512}
    assert r.get("uploading")["mods"] == ["firmware_ab", "fw_image", "fw_state"]
    assert r.get("uploading")["loads"] == 2
    assert r.get("state_while_uploading")["mods"] == ["firmware_ab", "fw_image", "fw_state"]
    assert r.body("cancel") == {}
    assert r.get("cancelled")["mods"] == []
    assert r.state("s1") == r.state("s3") and (1, 0) in r.state("s1")
    # A confirm goes to every image kind; the firmware, not on trial, loads nothing for it.
    assert "images" in r.body("confirm_bundle") and r.get("confirmed")["loads"] == r.get("cancelled")["loads"]


def test_no_bundle_trial_during_a_firmware_trial(tmp_path: Path, images: Images) -> None:
    r = Run(tmp_path, images)
    h = images.hash(images.fw)
    b = images.hash(images.bundle2)
    r.run(f"""
d.upload({str(images.fw)!r})
d.state_write({{"hash": {h!r}}}, 'state_write_fw')
d.boot()
d.upload({str(images.bundle2)!r}, image=1, tag='bundle_upload')
d.state_write({{"hash": {b!r}}}, 'state_write_bundle')
d.state('after')
""")
    assert r.get("bundle_upload")["reply"]["match"] is True  # staging is fine ...
    assert "err" in r.body("state_write_bundle") or "rc" in r.body("state_write_bundle")  # ... a second trial is not
    after = r.state("after")
    assert after[(0, 1)]["hash"] == b and "pending" not in after[(0, 1)]
    assert after[(1, 0)]["hash"] == h and "confirmed" not in after[(1, 0)]  # the firmware trial goes on


def test_board_without_ota_partitions(tmp_path: Path, images: Images) -> None:
    r = Run(tmp_path, images, table=NO_OTA)
    r.run(f"d.upload({str(images.fw)!r})\nd.state()")
    assert r.get("upload")["reply"] == {"rc": ENOTSUP}
    st = r.state()
    assert set(st) == {(0, 0)} and "image" not in cbor2.loads(r.frame("state")[8:])["images"][0]


# -- the host's CLI against the device ----------------------------------------------
class ConsoleDevice:
    """The ESP32 board running its receiver on the console ("serial":
    "stdin"), as on a board behind a USB-UART bridge: the process's stdin and
    stdout are a TCP connection to the simulator's pty bridge, so meterota and
    smpmgr talk to it through a pty (--port PATH). machine.reset() boots it
    again in the same process (fwdrv.serve), like a reset behind the bridge."""

    def __init__(self, run: Run, prelude: str = ""):
        from meterota.lab.sim import _SerialLink

        self.run = run
        cfg = json.loads((run.tmp / "config.json").read_text())
        cfg["serial"] = "stdin"
        (run.tmp / "config.json").write_text(json.dumps(cfg))
        first = [t for t in run.table if t[1] == 0][0][0]
        (run.tmp / "dev.py").write_text(
            f"import fwdrv, esp32\nesp32.setup('flash.bin', {run.table!r}, {first!r})\n"
            f"esp32.ECHO = True\n{prelude}\nfwdrv.serve()\n")
        self.link = _SerialLink("esp32", None, None, lambda: None, lambda: None)
        self.port = self.link.path
        conn = socket.create_connection(("127.0.0.1", self.link.port))
        self.err = open(run.tmp / "dev.err", "wb")
        env = dict(os.environ, MICROPYPATH=MP_PATH)
        self.proc = subprocess.Popen([str(MICROPYTHON), "-X", "heapsize=128wK", "dev.py"], stdin=conn.fileno(), stdout=conn.fileno(),
                                     stderr=self.err, cwd=run.tmp, env=env)
        conn.close()

    def log(self) -> list[list[Any]]:
        lines = (self.run.tmp / "dev.err").read_text().splitlines()
        return [json.loads(x)["log"] for x in lines if x.startswith("{")]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.err.close()
        self.link.close()


@pytest.fixture
def console_device(tmp_path: Path, images: Images) -> Iterator[Any]:
    devs: list[ConsoleDevice] = []

    def make(prelude: str = "", table: list[tuple[str, int, int, int, int]] = TABLE, **config: Any) -> ConsoleDevice:
        d = ConsoleDevice(Run(tmp_path, images, table, **config), prelude)
        devs.append(d)
        return d

    yield make
    for d in devs:
        d.close()


def cli(dev: ConsoleDevice, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("meterota", "--db", str(dev.run.tmp / "records.db"), *args[:1], "--port", dev.port,
                   *args[1:], timeout=60)


def test_meterota_upgrade_of_the_firmware(console_device: Any, images: Images) -> None:
    dev = console_device()
    h = images.hash(images.fw)
    p = cli(dev, "upgrade", str(images.fw), "--key", KEY.hex(), "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    assert (res["result"], res["from_version"], res["to_version"]) == ("OK", "1.24.1", "1.29.0+0")
    assert res["confirmation"]["result"] == "OK" and res["image_hash"] == h.hex()
    log = dev.log()
    assert log.index(["set_boot", "ota_1"]) < log.index(["reset", "ota_0"]) < log.index(["wdt", 30000]) \
        < log.index(["mark_valid", "ota_1"])
    # The new firmware runs, confirmed; the old one is its fallback.
    st = cli(dev, "images", "--json")
    assert st.returncode == 0, st.stderr
    fw = {e["slot"]: e for e in json.loads(st.stdout)["images"] if e.get("image") == 1}
    assert fw[0]["hash"] == h.hex() and fw[0]["confirmed"] and fw[1]["version"] == "1.24.1"
    again = cli(dev, "upgrade", str(images.fw), "--key", KEY.hex())
    assert again.returncode == 0 and "OK" in again.stdout


def test_meterota_upgrade_of_a_failing_firmware_reports_ko(console_device: Any, images: Images) -> None:
    dev = console_device("import sys\nclass _App:\n    selftest = staticmethod(lambda: False)\n"
                        "sys.modules['app'] = _App", self_confirm=True)
    p = cli(dev, "upgrade", str(images.fw), "--key", KEY.hex())
    assert p.returncode == 5, p.stdout + p.stderr
    assert "self-test returned False" in p.stderr
    st = json.loads(cli(dev, "images", "--json").stdout)["images"]
    assert [e["version"] for e in st if e.get("image") == 1 and e["slot"] == 0] == ["1.24.1"]


def test_meterota_refuses_firmware_for_a_board_without_ota(console_device: Any, images: Images) -> None:
    dev = console_device(table=NO_OTA)
    up = cli(dev, "upgrade", str(images.fw), "--key", KEY.hex())
    assert up.returncode == 4 and "no OTA" in up.stderr, up.stderr
    ul = cli(dev, "upload", str(images.fw))  # image 3, from the KIND TLV
    assert ul.returncode == 4 and "ENOTSUP" in ul.stderr, ul.stderr


def test_smpmgr_upgrades_the_firmware(console_device: Any, images: Images) -> None:
    """The standard tool: image 1 in its state read, `upgrade --slot 3` (upload
    into image 1, test, reset), then confirm."""
    dev = console_device()
    t = ["--port", dev.port, "--timeout", "5"]
    r = run_cli("smpmgr", *t, "image", "state-read", check=True)
    assert "1.24.1" in r.stdout and "1.0.0" in r.stdout, r.stdout
    run_cli("smpmgr", *t, "upgrade", "--slot", "3", str(images.fw), check=True)
    h = images.hash(images.fw).hex()
    for _ in range(50):  # the device resets into the trial
        st = cli(dev, "images", "--json")
        fw = {e["slot"]: e for e in json.loads(st.stdout)["images"] if e.get("image") == 1} if not st.returncode else {}
        if fw.get(0, {}).get("hash") == h:
            break
    assert fw[0]["hash"] == h and not fw[0].get("confirmed"), fw
    run_cli("smpmgr", *t, "image", "state-write", "--confirm", check=True)
    fw = {e["slot"]: e for e in json.loads(cli(dev, "images", "--json").stdout)["images"] if e.get("image") == 1}
    assert fw[0]["confirmed"] and ["mark_valid", "ota_1"] in dev.log()


# -- host: meterota image build --firmware ------------------------------------------
def test_image_build_firmware_cli(tmp_path: Path, images: Images) -> None:
    app = tmp_path / "micropython.bin"
    app.write_bytes(images.app)
    out = tmp_path / "fw.img"
    p = run_cli("meterota", "--json", "image", "build", "--firmware", str(app), "--version", "1.29.0",
                "--key", str(images.key), "-o", str(out), check=True)
    doc = json.loads(p.stdout)
    assert doc["kind"] == "firmware" and doc["signature"] == "ED25519"
    v = run_cli("imgtool", "verify", "-k", str(images.key), str(out), check=True)
    assert "Image was correctly validated" in v.stdout
    info = img.parse(out.read_bytes())
    assert info.is_firmware and info.board == "esp32" and info.hash_ok
    data = out.read_bytes()
    assert data[info.hdr_size:info.hdr_size + info.img_size] == images.app
    # kind and board are protected TLVs: covered by the hash and the signature
    assert info.protect_tlv_size > 0 and img.TLV_KIND in [t for t, _ in info.tlvs]
    i = run_cli("meterota", "--json", "image", "info", str(out), "--key", str(images.key), check=True)
    assert json.loads(i.stdout)["kind"] == "firmware" and json.loads(i.stdout)["signature_ok"]
    # A combined firmware.bin is refused on the host already (exit 8).
    comb = tmp_path / "firmware.bin"
    comb.write_bytes(combined_image(images.app))
    bad = run_cli("meterota", "image", "build", "--firmware", str(comb), "--version", "1.29.0", "-o",
                  str(tmp_path / "x.img"))
    assert bad.returncode == 8 and "firmware.bin" in bad.stderr
