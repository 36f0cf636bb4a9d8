"""The meter's multicast receiver (device/mcast.py) under MicroPython: the real
receiver dispatch over the unix board's NOR flash. Announce, blocks (lost,
forged, misordered, from elsewhere, for another image), parity rebuilds, the
unicast repair of the same session and a reboot in between: only the
announced, hash-verified image ever becomes testable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import Images, run_mp
from meterota.image import parse

BLOCK, SECTOR = 1024, 4096
HASH_NOT_FOUND = 8

# Runs on the device: a list of steps, one JSON line out per step.
SCRIPT = r"""
import sys, json, struct, binascii
import board, receiver, updater, cbor
b = board.Board(%(dir)r)
updater.Updater(b).select_boot()
ctx, disp = receiver.build(b)
steps = json.load(open(%(steps)r))
imgs = {}

def frame(op, group, cmd, body, seq=0):
    out = bytearray(8)
    cbor.dumps(body, out)
    struct.pack_into(">BBHHBB", out, 0, (1 << 3) | op, 0, len(out) - 8, group, seq, cmd)
    return out

def call(op, group, cmd, body, origin):
    r = disp.handle(frame(op, group, cmd, body), origin)
    if r is None:
        return None
    d = cbor.loads(memoryview(r)[8:])
    return {k: (binascii.hexlify(v).decode() if isinstance(v, (bytes, memoryview)) else v) for k, v in d.items()}

class image:
    # the image file, read a slice at a time: the harness must not take the receiver's heap
    def __init__(self, p):
        self.f = open(p, "rb")
        self.f.seek(0, 2)
        self.n = self.f.tell()

    def __len__(self):
        return self.n

    def __getitem__(self, sl):
        self.f.seek(sl.start)
        return self.f.read(max(0, min(sl.stop, self.n) - sl.start))

    def sha(self):
        h = __import__("hashlib").sha256()
        for o in range(0, self.n, 1024):
            h.update(self[o:o + 1024])
        return h.digest()

def xor(data, k, n):
    x = 0
    for o in range(k * 4096, min(n, k * 4096 + 4096), 1024):
        blk = bytearray(1024)
        c = data[o:o + 1024]
        blk[:len(c)] = c
        x ^= int.from_bytes(blk, "big")
    return x.to_bytes(1024, "big")

for st in steps:
    kind = st["k"]
    org = st.get("from", "conc")
    if kind == "ann":
        d = image(st["img"])
        h = d.sha()
        print(json.dumps(call(2, 64, 4, {"sid": st["sid"], "len": len(d), "sha": h, "hdr": d[0:32], "bs": 1024}, org)))
    elif kind == "blk":
        d = image(st["img"])
        o = st["off"]
        if st.get("parity"):
            data = xor(d, o // 4096, len(d))
        else:
            data = bytearray(d[o:o + 1024])
        if st.get("forge"):
            data[5] ^= 0xFF
        if "size" in st:
            data = bytearray(st["size"])
        body = {"s": st["sid"], "o": o + st.get("shift", 0), "d": data}
        if st.get("parity"):
            body["p"] = 1
        r = disp.handle(frame(2, 64, 5, body), org)
        print(json.dumps({"reply": r is not None}))
    elif kind == "xor":
        # A repair packet: the XOR of the blocks numbered in x, each zero-padded
        d = image(st["img"])
        acc = 0
        for i in st["x"]:
            blk = bytearray(1024)
            c = d[i * 1024:i * 1024 + 1024]
            blk[:len(c)] = c
            acc ^= int.from_bytes(blk, "big")
        data = bytearray(acc.to_bytes(1024, "big"))
        if "forge" in st:
            data[st["forge"]] ^= 0xFF
        if "size" in st:
            data = data[:st["size"]]
        body = {"s": st["sid"], "o": -1, "x": st.get("xs", st["x"]), "d": data}
        r = disp.handle(frame(2, 64, 5, body), org)
        print(json.dumps({"reply": r is not None}))
    elif kind == "status":
        print(json.dumps(call(0, 64, 4, {}, org)))
    elif kind == "repair":
        # The unicast upload of the same image, as the concentrator sends it:
        # 1 KiB chunks from wherever the meter says.
        d = image(st["img"])
        h = d.sha()
        r = call(2, 1, 1, {"off": 0, "len": len(d), "sha": h, "data": d[0:1024], "image": 1}, org)
        sent = 1024
        while "off" in r and r["off"] < len(d) and "rc" not in r and "err" not in r:
            o = r["off"]
            r = call(2, 1, 1, {"off": o, "data": d[o:o + 1024]}, org)
            sent += len(d[o:o + 1024])
        r["sent"] = sent
        print(json.dumps(r))
    elif kind == "test":
        d = image(st["img"])
        print(json.dumps(call(2, 1, 0, {"hash": binascii.unhexlify(st["hash"]), "confirm": False}, org)))
    elif kind == "info":
        r = disp.handle(frame(0, 64, 0, st.get("body", {})), org)
        d = cbor.loads(memoryview(r)[8:])
        print(json.dumps({"len": len(r), "keys": sorted(d), "boots": d["boots"], "trial": d["trial"],
                          "slots": [{"active": e["active"], "hash": binascii.hexlify(e.get("hash", b"")).decode()}
                                    for e in d["slots"]]}))
    elif kind == "state":
        r = disp.handle(frame(0, 1, 0, {}), org)
        d = cbor.loads(memoryview(r)[8:])
        print(json.dumps([{"slot": e["slot"], "hash": binascii.hexlify(e["hash"]).decode()} for e in d["images"]]))
"""


def _state_dir(tmp_path: Path) -> Path:
    from meterota.boards import provision_unix, unix_config_extra

    d = tmp_path / "dev"
    if not d.exists():
        d.mkdir()
        cfg = {"id": "meter-m", "key": "11" * 32, "serial": None, "udp": None, **unix_config_extra()}
        (d / "config.json").write_text(json.dumps(cfg))
        provision_unix(d)
    return d


def run(tmp_path: Path, steps: list[dict[str, Any]]) -> list[Any]:
    d = _state_dir(tmp_path)
    p = tmp_path / "steps.json"
    p.write_text(json.dumps(steps))
    out = run_mp(tmp_path, SCRIPT % {"dir": str(d), "steps": str(p)}).stdout.splitlines()
    return [json.loads(x) for x in out]


def blocks(img: Path, sid: int, lose: set[int] = frozenset(), parity: bool = True, **kw: Any) -> list[dict[str, Any]]:
    n = len(img.read_bytes())
    out: list[dict[str, Any]] = []
    for s in range(0, n, SECTOR):
        for o in range(s, min(n, s + SECTOR), BLOCK):
            if o // BLOCK not in lose:
                out.append({"k": "blk", "img": str(img), "sid": sid, "off": o, **kw})
        if parity and -1 - s // SECTOR not in lose:
            out.append({"k": "blk", "img": str(img), "sid": sid, "off": s, "parity": 1, **kw})
    return out


@pytest.fixture()
def image(images: Images) -> Path:
    return images.app("1.1.0")


def test_blocks_parity_and_repair_make_the_image(tmp_path: Path, image: Path) -> None:
    n = len(image.read_bytes())
    # Block 1 lost (parity rebuilds it), blocks 4 and 5 lost (sector 1: two
    # missing, repair by unicast), the last sector's parity lost too.
    last = (n - 1) // SECTOR
    lose = {1, 4, 5, -1 - last, last * 4}
    out = run(tmp_path, [{"k": "ann", "img": str(image), "sid": 7}] + blocks(image, 7, lose)
              + [{"k": "status"}, {"k": "repair", "img": str(image)}, {"k": "state"}])
    ann, *blk, status, rep, state = out
    assert ann["off"] == 0 and ann["sid"] == 7
    assert not any(b["reply"] for b in blk)  # blocks are never answered
    assert status["rebuilt"] == 1 and status["dropped"] == 1  # sector 1 lost two: its parity cannot help
    assert rep.get("match") is True, rep
    assert rep["sent"] <= 4 * BLOCK  # block 0 of the first request, blocks 4, 5 and the last sector's first
    assert state[1]["hash"] == parse(image.read_bytes()).hash.hex()


def test_forged_block_never_becomes_testable(tmp_path: Path, image: Path) -> None:
    steps = [{"k": "ann", "img": str(image), "sid": 9}] + blocks(image, 9)
    steps[3]["forge"] = True  # same session and sender, wrong bytes
    h = parse(image.read_bytes()).hash.hex()
    out = run(tmp_path, steps + [{"k": "repair", "img": str(image)}, {"k": "state"},
                                 {"k": "test", "img": str(image), "hash": h}])
    rep, state, test = out[-3:]
    assert rep.get("err", {}).get("rc") == 24, rep  # INVALID_HASH at the end checks
    assert len(state) == 1  # slot B holds no image
    assert test["err"]["rc"] == HASH_NOT_FOUND
    # The session is over: a plain upload from scratch makes it.
    again = run(tmp_path, [{"k": "repair", "img": str(image)}, {"k": "state"}])
    assert again[0].get("match") is True and again[0]["sent"] == len(image.read_bytes())
    assert again[1][1]["hash"] == h


def test_bad_blocks_are_dropped(tmp_path: Path, image: Path, images: Images) -> None:
    other = images.app("1.2.0")
    bad = [{"k": "blk", "img": str(image), "sid": 5, "off": 0},  # before the announce: a late joiner
           ]
    steps = bad + [{"k": "ann", "img": str(image), "sid": 5}]
    steps += [{"k": "blk", "img": str(image), "sid": 6, "off": 0},  # another session id
              {"k": "blk", "img": str(image), "sid": 5, "off": 0, "from": "elsewhere"},  # another sender
              {"k": "blk", "img": str(image), "sid": 5, "off": 0, "shift": 512},  # not block aligned
              {"k": "blk", "img": str(image), "sid": 5, "off": 0, "size": 1000},  # wrong size
              {"k": "blk", "img": str(image), "sid": 5, "off": 1 << 20},  # past the end
              {"k": "status"}]
    out = run(tmp_path, steps)
    assert out[-1]["blocks"] == 0 and out[-1]["dropped"] == 5 and out[-1]["off"] == 0
    # A second announce of the same image keeps what arrived; another image starts over
    # and the first one's blocks are refused.
    out = run(tmp_path, [{"k": "ann", "img": str(image), "sid": 5}] + blocks(image, 5)[:6]
              + [{"k": "ann", "img": str(image), "sid": 8}, {"k": "status"}]
              + [{"k": "ann", "img": str(other), "sid": 11}] + blocks(image, 8)[:3] + blocks(other, 11)[:2]
              + [{"k": "status"}])
    assert out[7]["off"] == out[8]["off"] == SECTOR + BLOCK  # sector 0 and block 4 were kept
    assert out[8]["blocks"] == 0 and out[8]["sid"] == 8  # counters are per session id
    assert out[-1]["blocks"] == 2 and out[-1]["dropped"] == 3  # the blocks of sid 8 (the first image) refused
    rep = run(tmp_path, [{"k": "repair", "img": str(other)}, {"k": "state"}])
    assert rep[0].get("match") is True and rep[0]["sent"] < len(other.read_bytes())
    assert rep[1][1]["hash"] == parse(other.read_bytes()).hash.hex()


def test_reboot_mid_session_resumes_from_the_progress_map(tmp_path: Path, image: Path) -> None:
    n = len(image.read_bytes())
    half = blocks(image, 3, lose={2, 3})[: (n // BLOCK) // 2]
    run(tmp_path, [{"k": "ann", "img": str(image), "sid": 3}] + half)
    # A new process: the board rebooted; the repair resumes the same session.
    rep = run(tmp_path, [{"k": "repair", "img": str(image)}, {"k": "state"}])
    assert rep[0].get("match") is True, rep
    assert rep[0]["sent"] < n * 0.7
    assert rep[1][1]["hash"] == parse(image.read_bytes()).hash.hex()


def test_misordered_blocks_and_a_loss_burst(tmp_path: Path, image: Path) -> None:
    n = len(image.read_bytes())
    # Every block, last first (parity blocks too): order does not matter.
    out = run(tmp_path, [{"k": "ann", "img": str(image), "sid": 1}] + blocks(image, 1)[::-1]
              + [{"k": "status"}, {"k": "repair", "img": str(image)}, {"k": "state"}])
    status, rep, state = out[-3:]
    # Each parity block came before its sector's data: of no use, dropped --
    # except a last sector of one block, whose parity is that block itself.
    sectors = -(-n // SECTOR)
    single = 1 if -(-(n - (sectors - 1) * SECTOR) // BLOCK) == 1 else 0
    assert status["dropped"] == sectors - single and status["rebuilt"] == single
    assert status["blocks"] + status["rebuilt"] >= -(-n // BLOCK)
    assert rep.get("match") is True and rep["sent"] == BLOCK  # only the first request: all was in flash
    assert state[1]["hash"] == parse(image.read_bytes()).hash.hex()


def test_loss_burst_is_repaired_block_by_block(tmp_path: Path, image: Path, images: Images) -> None:
    other = images.app("1.2.0")
    n = len(other.read_bytes())
    burst = set(range(5, 13))  # 8 blocks in a row: 3 of sector 1, all of sector 2, 1 of sector 3
    out = run(tmp_path, [{"k": "ann", "img": str(other), "sid": 2}] + blocks(other, 2, burst)
              + [{"k": "status"}, {"k": "repair", "img": str(other)}, {"k": "state"}])
    status, rep, state = out[-3:]
    assert status["rebuilt"] == 1  # block 12, from sector 3's parity
    assert rep.get("match") is True
    assert rep["sent"] == BLOCK + 7 * BLOCK  # the first request, then exactly the blocks still missing
    assert state[1]["hash"] == parse(other.read_bytes()).hash.hex()
    assert n > 16 * BLOCK


def xor(img: Path, sid: int, x: list[int], **kw: Any) -> dict[str, Any]:
    return {"k": "xor", "img": str(img), "sid": sid, "x": x, **kw}


def test_repair_packets_rebuild_one_missing_block_each(tmp_path: Path, image: Path) -> None:
    n = len(image.read_bytes())
    last = (n - 1) // BLOCK
    assert n % BLOCK, "the last block must be a short one (zero-padded in the XOR)"
    assert last > 12
    lose = {1, 6, 10, last}
    steps = [{"k": "ann", "img": str(image), "sid": 4}] + blocks(image, 4, lose, parity=False) + [
        xor(image, 4, [0, 1, 7]),  # misses 1: rebuilt from 0 (hashed sector) and 7 (a block of a partial sector)
        xor(image, 4, [6, 8, 10]),  # misses 6 and 10: cannot help, dropped
        {"k": "status"},
        xor(image, 4, [2, 6, 11]),  # misses 6
        xor(image, 4, [3, last]),  # misses the last, short block
        xor(image, 4, [10, 12]),  # misses 10
        xor(image, 4, [1, 6]),  # misses none of them any more: ignored
        {"k": "status"}, {"k": "repair", "img": str(image)}, {"k": "state"}]
    out = run(tmp_path, steps)
    mid, status, rep, state = out[-8], out[-3], out[-2], out[-1]
    assert not any(x.get("reply") for x in out[1:-3])  # never answered
    assert mid["xrep"] == 1 and mid["dropped"] == 1
    m = bytes.fromhex(mid["map"])
    assert m[1] & 0b0100 and m[2] & 0b0100 and not m[0]  # the dropped packet wrote nothing
    assert status["xrep"] == 4 and status["dropped"] == 1 and status["rebuilt"] == 0
    assert not any(bytes.fromhex(status["map"]))  # all in flash
    assert rep.get("match") is True and rep["sent"] == BLOCK, rep  # only the first request
    assert state[1]["hash"] == parse(image.read_bytes()).hash.hex()


def test_forged_repair_packet_never_becomes_testable(tmp_path: Path, image: Path) -> None:
    n = len(image.read_bytes())
    last = (n - 1) // BLOCK
    h = parse(image.read_bytes()).hash.hex()
    steps = [{"k": "ann", "img": str(image), "sid": 12}] + blocks(image, 12, {2, last}, parity=False) + [
        xor(image, 12, [0, last], forge=BLOCK - 1),  # rebuilds the short last block: padding not zero, dropped
        xor(image, 12, [2, 5], forge=100),  # right session and sender, wrong bytes: programmed
        {"k": "status"}, {"k": "repair", "img": str(image)}, {"k": "state"},
        {"k": "test", "img": str(image), "hash": h}]
    status, rep, state, test = run(tmp_path, steps)[-4:]
    assert status["xrep"] == 1 and status["dropped"] == 1
    assert rep.get("err", {}).get("rc") == 24, rep  # INVALID_HASH at the end checks
    assert len(state) == 1  # slot B holds no image
    assert test["err"]["rc"] == HASH_NOT_FOUND


def test_bad_repair_packets_are_dropped(tmp_path: Path, image: Path) -> None:
    n = len(image.read_bytes())
    nblk = -(-n // BLOCK)
    steps = [xor(image, 3, [0, 1])]  # before the announce
    steps += [{"k": "ann", "img": str(image), "sid": 3}] + blocks(image, 3, {1, 9}, parity=False)
    bad = [xor(image, 30, [1, 2]),  # another session id
           xor(image, 3, [1, 2], **{"from": "elsewhere"}),  # another sender
           xor(image, 3, [2, 1]),  # misordered
           xor(image, 3, [1, 1, 2]),  # repeated
           xor(image, 3, [1, nblk]),  # past the end
           xor(image, 3, [1, 2], size=1000),  # wrong size
           xor(image, 3, [], xs=[]),  # empty
           xor(image, 3, list(range(2, 35)) + [1]),  # more than 32 blocks (and misordered)
           xor(image, 3, [1, 2], xs=[1, "2"])]  # not block numbers
    out = run(tmp_path, steps + bad + [{"k": "status"}, xor(image, 3, [1, 2]), xor(image, 3, [9]), {"k": "status"},
                                       {"k": "repair", "img": str(image)}, {"k": "state"}])
    before, after, rep, state = out[-6], out[-3], out[-2], out[-1]
    assert before["xrep"] == 0 and before["dropped"] == len(bad)
    m = bytes.fromhex(before["map"])
    assert m[0] & 15 == 0b0010 and m[2] & 15 == 0b0010  # nothing of the bad packets reached flash
    assert after["xrep"] == 2 and after["dropped"] == len(bad)
    assert rep.get("match") is True and rep["sent"] == BLOCK
    assert state[1]["hash"] == parse(image.read_bytes()).hash.hex()


def test_brief_info_is_what_a_concentrator_polls_for(tmp_path: Path, image: Path) -> None:
    full, brief = run(tmp_path, [{"k": "info"}, {"k": "info", "body": {"brief": True}}])
    assert brief["keys"] == ["boots", "self_confirm", "slots", "trial"]
    assert {k: brief[k] for k in ("boots", "trial", "slots")} == {k: full[k] for k in ("boots", "trial", "slots")}
    assert brief["len"] * 2 < full["len"] + 40, (brief, full)  # about half the airtime of a poll's reply
