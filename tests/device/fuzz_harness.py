# Fuzz harness: runs ON THE DEVICE side, under the MicroPython unix interpreter
# (tests/device/test_fuzz.py and tools/fuzz.py start it; never import it into
# CPython):
#
#   MICROPYPATH=boards/unix:DEVICE micropython -X heapsize=64wK \
#       tests/device/fuzz_harness.py STATE_DIR CASES_FILE [K]
#
# DEVICE is device/ compiled to .mpy (as in an image bundle; test_fuzz.make_env does
# it), or device/ itself (the sources need about 12wK more heap to compile).
#
# STATE_DIR holds config.json and a provisioned flash.bin (unix board). The
# device boots as the boot stage would (select_boot), builds the receiver
# (receiver.build) and gets the cases from CASES_FILE, records of
#   kind (1 byte) | u32 big-endian length | payload
# kinds:
#   S  raw serial bytes, fed to one framing.Deframer whose frames go to
#      disp.handle (and the replies through framing.encode, as link.py does)
#   F  one raw SMP frame (a datagram) to disp.handle, from UDP peer 0
#   G  origin byte k + one raw SMP frame, from UDP peer k (another host)
#   I  the line went idle: Deframer.reset()
#   M  memory checkpoint: gc.collect(), print mem_alloc
# One output line per record:
#   F none | F <reply hex>       (G records answer "G ...")
#   S                            after one "R <kind>:<reply hex>" line per frame answered
#   I
#   ESCAPED <type> <message>      an exception got out of disp.handle (F, G)
#   S ESCAPED <type> <message>    an exception got out of Deframer.feed (S)
#   NOMEM <n>                     the datagram buffer (buf_size + 8 bytes, as link.DatagramLink's
#                                 recvfrom allocates it) could not be allocated, even after a collection
#   MR <mem_alloc> <mem_free>     for an M record; "M ..." for the harness' own checkpoints
# with " reset:<slot>" appended when the request asked for a reset (the device is
# then rebooted the way the board would: select_boot and a new receiver; <slot> is
# what select_boot chose). The run starts with "B <slot>", the valid requests
# ("V <name> <reply hex>"), "W ..." (the warm-up) and "M ..." (the heap after boot);
# "M ..." again every K records and at the end, then the valid requests once more
# and "END <records>". The device's own prints ("meterota: ...") come before the
# line of the record that caused them.
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


def peer(k):
    return ("127.0.0.%d" % (2 + k), 1337)  # what link.DatagramLink passes as the origin


# Output is written in pieces, so that the harness itself allocates nothing big: a reply of
# 2 KB as one hex string would need 4 KB of the device's heap.
write = sys.stdout.write
wbytes = sys.stdout.buffer.write


def whex(r):
    mv = memoryview(r)
    for i in range(0, len(mv), 96):
        wbytes(binascii.hexlify(mv[i:i + 96]))


def reply_line(tag, r):
    write(tag)
    if r is None:
        write(" none")
    else:
        write(" ")
        whex(r)


def valid_requests(disp, defr):
    for name, f in VALID:
        try:
            r = disp.handle(f, peer(0))
            reply_line("V " + name, r)
            write("\n")
        except Exception as e:
            print("V", name, escaped(e))
    # The same request through both serial framings, after the line went idle.
    for name, kind in (("serial_console", framing.CONSOLE), ("serial_binary", framing.BINARY)):
        defr.reset()

        def on_frame(frame, k):
            r = disp.handle(frame, "serial")
            if r is not None:
                framing.encode(r, k, bytearray())
                reply_line("V " + name, r)
                write("\n")

        try:
            defr.feed(memoryview(framing.encode(VALID[0][1], kind, bytearray())), on_frame)
        except Exception as e:
            print("V", name, escaped(e))


def main():
    b = board.Board(STATE)
    slot, ctx, disp, defr = boot(b)
    print("B", slot)
    buf = bytearray(_MAXREC)
    mv = memoryview(buf)
    hdr = bytearray(5)
    valid_requests(disp, defr)
    # Warm up what the device allocates once, on first use: the inflate buffer and the
    # deflate module of the compressed upload (an empty block, refused).
    r = disp.handle(req(2, 64, 3, {"off": 0, "data": b"", "rlen": 0}), peer(0))
    reply_line("W", r)
    write("\n")
    r = None
    defr.reset()
    mem()

    def on_frame(frame, k):
        r = disp.handle(frame, "serial")  # what link.StreamLink passes
        if r is not None:
            framing.encode(r, k, bytearray())  # what link.StreamLink writes back
            reply_line("R %d:" % k, r)
            write("\n")

    n = 0
    cf = open(CASES, "rb")
    while True:
        if cf.readinto(hdr) != 5:
            break
        kind = hdr[0]
        ln = struct.unpack_from(">I", hdr, 1)[0]
        if ln > _MAXREC:
            cf.seek(ln, 1)
            print("SKIPPED", ln)
            continue
        data = mv[:ln]
        if cf.readinto(data) != ln:
            print("SHORT")
            break
        n += 1
        if kind == 0x46 or kind == 0x47:  # F, G
            k = 1 if kind == 0x47 and ln else 0
            # As link.DatagramLink: recvfrom(frame_max + 8) allocates that much per
            # datagram, collecting the garbage once when the heap has no room.
            try:
                d = bytearray(ctx.buf_size + 8)
            except MemoryError:
                gc.collect()
                try:
                    d = bytearray(ctx.buf_size + 8)
                except MemoryError:
                    d = None
                    write("NOMEM %d" % (ctx.buf_size + 8))
            if d is not None:
                d[:ln - k] = data[k:]
                fr = memoryview(d)[:ln - k]
                try:
                    r = disp.handle(fr, peer(data[0]) if k else peer(0))
                    reply_line(chr(kind), r)
                except Exception as e:
                    write(escaped(e))
                fr = d = r = None
        elif kind == 0x53:  # S: replies come first, one "R" line each
            try:
                defr.feed(data, on_frame)
                write("S")
            except Exception as e:
                write("S " + escaped(e))
        elif kind == 0x49:  # I
            defr.reset()
            write("I")
        elif kind == 0x4D:  # M
            mem("MR")
            continue
        else:
            write("UNKNOWN %d" % kind)
        if ctx.reset_requested:
            # board.reset(): the process would exit and the board boot again.
            ctx = disp = defr = None
            gc.collect()
            slot, ctx, disp, defr = boot(b)
            write(" reset:%d" % slot)
        write("\n")
        if n % K == 0:
            mem()
    cf.close()
    mem()
    defr.reset()
    valid_requests(disp, defr)
    mem()
    print("END", n)


main()
