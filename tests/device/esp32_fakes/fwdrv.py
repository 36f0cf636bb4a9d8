# Device-side driver for tests/device/test_firmware_ab.py: runs under the unix
# MicroPython with boards/esp32 (the real board, fw_image, firmware_ab), the
# fake esp32 and machine modules of this directory, boards/unix (norflash) and
# device/ on MICROPYPATH. It boots the ESP32 board the way a reset does
# (bootloader, select_boot, receiver.build, board.ready) and hands SMP frames
# to the receiver's dispatcher; each reply goes out as a JSON line with the
# frame in hex, for the CPython side to decode and check.
import sys
import json
import struct
import binascii
import hashlib
import esp32
import fake_machine

sys.modules["machine"] = fake_machine
import cbor  # noqa: E402

CFG = "config.json"


def out(tag, **kw):
    kw["tag"] = tag
    print(json.dumps(kw))


class Dev:
    def __init__(self):
        self.ctx = None
        self.disp = None
        self.seq = 0

    def boot(self, recovery=False):
        """A reset: the bootloader picks the app, then the boot stage and the
        receiver start; a reset during that boots again. Returns the running
        OTA partition's label."""
        import board
        import updater
        import receiver

        for _ in range(4):
            running = esp32.bootloader()
            try:
                b = board.Board(CFG)
                updater.Updater(b).select_boot()
                self.ctx, self.disp = receiver.build(b, recovery)
                b.ready(self.ctx)
                out("boot", running=running)
                return running
            except fake_machine.Reset:
                recovery = False
        raise RuntimeError("boot loop")

    def call(self, op, group, cmd, body, tag=None):
        self.seq = (self.seq + 1) & 0xFF
        f = bytearray(8)
        cbor.dumps(body, f)
        struct.pack_into(">BBHHBB", f, 0, 8 | op, 0, len(f) - 8, group, self.seq, cmd)
        r = bytes(self.disp.handle(f, "host"))
        if tag:
            out(tag, frame=binascii.hexlify(r).decode())
        return cbor.loads(r[8:])

    def state(self, tag="state"):
        return self.call(0, 1, 0, {}, tag)

    def state_write(self, body, tag="state_write"):
        return self.call(2, 1, 0, body, tag)

    def erase(self, slot, tag="erase"):
        return self.call(2, 1, 5, {"slot": slot}, tag)

    def record(self, tag="record"):
        return self.call(0, 64, 1, {}, tag)

    def upload(self, path, image=3, first=87, chunk=1900, tag="upload"):
        """smpclient's upload loop (first chunk as small as smpmgr's): the
        device's off drives it; the last reply (or the first error) is emitted."""
        import os

        size = os.stat(path)[6]
        h = hashlib.sha256()
        buf = bytearray(chunk)
        with open(path, "rb") as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(memoryview(buf)[:n])
            off = 0
            while True:
                n = first if off == 0 else chunk
                f.seek(off)
                k = f.readinto(memoryview(buf)[:min(n, size - off)])
                body = {"off": off, "data": memoryview(buf)[:k]}
                if off == 0:
                    body["len"] = size
                    body["sha"] = h.digest()
                    body["image"] = image
                r = self.call(2, 1, 1, body)
                if "off" not in r or r["off"] >= size:
                    break
                off = r["off"]
        out(tag, reply=plain(r))
        return r


def plain(x):
    if isinstance(x, (bytes, bytearray, memoryview)):
        return binascii.hexlify(bytes(x)).decode()
    if isinstance(x, dict):
        return {k: plain(x[k]) for k in x}
    if isinstance(x, list):
        return [plain(i) for i in x]
    return x


def log(tag="log"):
    out(tag, log=[list(e) for e in esp32.LOG])
    del esp32.LOG[:]


def serve():
    """The board as a running device: the receiver on the console ("serial":
    "stdin", here the process's stdin/stdout, a TCP connection from the test)
    until the link ends; machine.reset() boots it again (bootloader, boot
    stage, receiver), the link stays up like a USB-UART bridge's."""
    import board
    import updater
    import receiver

    while True:
        running = esp32.bootloader()
        sys.stderr.write("fwdrv: boot %s\n" % running)
        try:
            b = board.Board(CFG)
            updater.Updater(b).select_boot()
            receiver.main(b)
        except fake_machine.Reset:
            sys.stderr.write("fwdrv: reset\n")
