# Power-cut campaign, device side (runs under MicroPython on the unix board):
#   micropython tools/powercut_device.py STATE_DIR ACTION IMAGE
# ACTION: boot | upload | test | confirm | check | drive
# Each run is one power-on of the device; MTR_POWERFAIL cuts it at a flash op.
import sys
import json
import binascii
import board
import updater
import grp_image
import upload

STATE, ACTION, IMAGE = sys.argv[1], sys.argv[2], sys.argv[3]
CHUNK = 2000


class _Disp:
    origin = None


def _read(f, off, n):
    f.seek(off)
    return f.read(n)


def image_hash(path):
    # The image is read from the file piecewise: the harness lives in the
    # device's heap budget too.
    import image
    import os

    size = os.stat(path)[6]
    with open(path, "rb") as f:
        hdr = image.Header(_read(f, 0, 32))
        tlvs, _ = image.read_tlvs(lambda o, n: _read(f, o, n), hdr.payload_end, size)
    return tlvs[image.TLV_SHA256], size


def do_upload(up):
    import hashlib

    g = grp_image.ImageGroup(up, _Disp())
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    with open(IMAGE, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
        size = f.tell()
        sha = h.digest()
        f.seek(0)
        n = f.readinto(buf)
        r = g.upload({"off": 0, "len": size, "sha": sha, "data": mv[:n], "image": 1})
        while r["off"] < size:
            off = r["off"]
            f.seek(off)
            n = f.readinto(buf)
            r = g.upload({"off": off, "data": mv[:n]})
    assert r.get("match") is True, r


def do_test(up, h):
    g = grp_image.ImageGroup(up, _Disp())
    g.state_write({"hash": h, "confirm": False})


def report(up, booted):
    out = {"boot": booted, "active": up.st.active, "pending": up.st.pending, "trial": up.st.trial,
           "images": [], "files": 0}
    import imgstate

    for e in imgstate.slots_images(up):
        out["images"].append({"slot": e["slot"], "hash": binascii.hexlify(e["hash"]).decode(),
                              "pending": e.get("pending", False), "confirmed": e.get("confirmed", False)})
    out["phys"] = [up.active, up.other]
    if booted >= 0:
        import mtboot
        import os

        mtboot.mount(up, booted)
        out["files"] = len(os.listdir(mtboot.APP_MOUNT))
    return out


def drive(b, new_hash):
    # Finish the upgrade from whatever state a cut left, one power-on per step.
    for _ in range(8):
        up = updater.Updater(b)
        booted = up.select_boot()
        act = up.slots.info(up.active) if up.active != 0xFF else None
        if act is not None and act.hash == new_hash:
            if not up.st.trial:
                return report(up, booted)
            up.confirm()
            continue
        oth = up.slots.info(up.other)
        if oth is not None and oth.hash == new_hash and up.session.state != upload.RUNNING:
            if up.st.pending != up.other:
                do_test(up, new_hash)
            continue
        if up.st.pending == up.other:
            up.erase(up.other)
        do_upload(up)
    raise AssertionError("upgrade did not complete")


b = board.Board(STATE)
new_hash, _ = image_hash(IMAGE)
if ACTION == "boot":
    updater.Updater(b).select_boot()
elif ACTION == "upload":
    do_upload(updater.Updater(b))
elif ACTION == "test":
    do_test(updater.Updater(b), new_hash)
elif ACTION == "confirm":
    updater.Updater(b).confirm()
elif ACTION == "check":
    up = updater.Updater(b)
    valid = up.st.valid  # a boot record must survive any cut
    rep = report(up, up.select_boot())
    rep["state_valid"] = valid
    print("REPORT", json.dumps(rep))
elif ACTION == "drive":
    print("REPORT", json.dumps(drive(b, new_hash)))
print("OPS", b.flash.ops)
