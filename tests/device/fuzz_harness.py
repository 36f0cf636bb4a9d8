# Fuzz harness: runs ON THE DEVICE side, under the MicroPython unix interpreter
# (tests/device/test_fuzz.py and tools/fuzz.py start it; never import it into
# CPython):
#
#   MICROPYPATH=boards/unix:device micropython -X heapsize=64wK \
#       tests/device/fuzz_harness.py STATE_DIR CASES_FILE [K]
#
# STATE_DIR holds config.json and a provisioned flash.bin (unix board). The
# device boots as the boot stage would (select_boot), builds the receiver
# (receiver.build) and gets the cases from CASES_FILE, records of
#   kind (1 byte) | u32 big-endian length | payload
# kinds:
#   S  raw serial bytes, fed to one framing.Deframer whose frames go to
#      disp.handle (and the replies through framing.encode, as link.py does)
#   F  one raw SMP frame (a datagram) to disp.handle
#   I  the line went idle: Deframer.reset()
#   M  memory checkpoint: gc.collect(), print mem_alloc
# One output line per record:
#   F none | F <reply hex>
#   S [<kind>:<reply hex> ...]
#   I
#   MR <mem_alloc> <mem_free>     (for an M record; "M ..." for the harness' own checkpoints)
#   ESCAPED <type> <message>      an exception got out of disp.handle / feed
# with " reset:<slot>" appended when the request asked for a reset (the device is
# then rebooted the way the board would: select_boot and a new receiver; <slot> is
# what select_boot chose). Every K
# records, after the boot and at the end: "M ..." lines. The run starts with
# "B <slot>" (the slot select_boot chose) and ends with the valid requests
# ("V <name> <reply hex>", once right after boot and once at the end) and
# "END <records>".
import sys
import gc
import struct
import binascii

import board
import updater
import receiver
import framing
import cbor

STATE = sys.argv[1]
CASES = sys.argv[2]
K = int(sys.argv[3]) if len(sys.argv) > 3 else 100

_MAXREC = 4096  # biggest record payload read (the CPython side cuts serial streams to fit)


def boot(b):
    slot = updater.Updater(b).select_boot()
    ctx, disp = receiver.build(b)
    return slot, ctx, disp, framing.Deframer(ctx.buf_size)


def escaped(e):
    msg = str(e).replace("\n", " ")[:120]
    return "ESCAPED %s %s" % (type(e).__name__, msg)


def mem(tag="M"):
    gc.collect()
    print(tag, gc.mem_alloc(), gc.mem_free())


def req(op, group, cmd, body, ver=1, seq=0x5A):
    out = bytearray(8)
    cbor.dumps(body, out)
    struct.pack_into(">BBHHBB", out, 0, (ver << 3) | op, 0, len(out) - 8, group, seq, cmd)
    return out


VALID = (
    ("params", req(0, 0, 6, {})),
    ("params_v0", req(0, 0, 6, {}, ver=0)),
    ("state", req(0, 1, 0, {})),
    ("echo", req(2, 0, 0, {"d": "still alive"})),
    ("info", req(0, 64, 0, {})),
    ("stats", req(0, 64, 2, {})),
)


def valid_requests(disp, defr):
    for name, f in VALID:
        try:
            r = disp.handle(f)
            print("V", name, "none" if r is None else binascii.hexlify(r).decode())
        except Exception as e:
            print("V", name, escaped(e))
    # The same request through both serial framings, after the line went idle.
    for name, kind in (("serial_console", framing.CONSOLE), ("serial_binary", framing.BINARY)):
        defr.reset()
        got = []

        def on_frame(frame, k):
            r = disp.handle(frame)
            if r is not None:
                framing.encode(r, k, bytearray())
                got.append("%d:%s" % (k, binascii.hexlify(r).decode()))

        try:
            defr.feed(memoryview(framing.encode(VALID[0][1], kind, bytearray())), on_frame)
            print("V", name, " ".join(got) if got else "none")
        except Exception as e:
            print("V", name, escaped(e))


def main():
    b = board.Board(STATE)
    slot, ctx, disp, defr = boot(b)
    print("B", slot)
    buf = bytearray(_MAXREC)
    mv = memoryview(buf)
    hdr = bytearray(5)
    out = []
    valid_requests(disp, defr)
    defr.reset()
    mem()

    def on_frame(frame, k):
        r = disp.handle(frame)
        if r is not None:
            framing.encode(r, k, bytearray())  # what link.StreamLink writes back
            out.append("%d:%s" % (k, binascii.hexlify(r).decode()))

    n = 0
    f = open(CASES, "rb")
    while True:
        if f.readinto(hdr) != 5:
            break
        kind = hdr[0]
        ln = struct.unpack_from(">I", hdr, 1)[0]
        if ln > _MAXREC:
            f.seek(ln, 1)
            print("SKIPPED", ln)
            continue
        data = mv[:ln]
        if f.readinto(data) != ln:
            print("SHORT")
            break
        n += 1
        line = None
        if kind == 0x46:  # F
            try:
                r = disp.handle(bytes(data))
                line = "F none" if r is None else "F " + binascii.hexlify(r).decode()
            except Exception as e:
                line = escaped(e)
        elif kind == 0x53:  # S
            out.clear()
            try:
                defr.feed(data, on_frame)
                line = "S " + " ".join(out) if out else "S"
            except Exception as e:
                line = escaped(e)
        elif kind == 0x49:  # I
            defr.reset()
            line = "I"
        elif kind == 0x4D:  # M
            mem("MR")
            continue
        else:
            line = "UNKNOWN %d" % kind
        if ctx.reset_requested:
            # board.reset(): the process would exit and the board boot again.
            ctx = disp = defr = None
            gc.collect()
            slot, ctx, disp, defr = boot(b)
            line += " reset:%d" % slot
        print(line)
        if n % K == 0:
            mem()
    f.close()
    out.clear()
    mem()
    defr.reset()
    valid_requests(disp, defr)
    mem()
    print("END", n)


main()
