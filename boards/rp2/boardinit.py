# What the Pico's board does once, at boot: read its flash map (the layouts per
# variant, mirroring layout.json; which one this board is; where its meta area and slots
# live: "raw", rp2.Flash windows past the root FS, or "files", littlefs files under /mtr,
# board.py says why) and open its links. board.py imports it for that and drops it: on
# stock firmware a module's bytecode lives in the heap, and none of this runs again
# while the receiver serves.
import os
import sys


def layouts():
    """The layouts per variant, mirroring layout.json (offsets relative to the FS
    region start)."""
    K = 1024
    return {
        "pico": {"fs_size": 1408 * K, "fs": [0, 368 * K], "meta": [368 * K, 16 * K],
                 "slot_a": [384 * K, 512 * K], "slot_b": [896 * K, 512 * K]},
        "pico_w": {"fs_size": 848 * K, "fs": [0, 192 * K], "meta": [192 * K, 16 * K],
                   "slot_a": [208 * K, 320 * K], "slot_b": [528 * K, 320 * K]},
        "pico2": {"fs_size": 3072 * K, "fs": [0, 1008 * K], "meta": [1008 * K, 16 * K],
                  "slot_a": [1024 * K, 1024 * K], "slot_b": [2048 * K, 1024 * K]},
        "pico2_w": {"fs_size": 2560 * K, "fs": [0, 1008 * K], "meta": [1008 * K, 16 * K],
                    "slot_a": [1024 * K, 768 * K], "slot_b": [1792 * K, 768 * K]},
    }


def variant_for(fs_size):
    for name, lay in layouts().items():
        if lay["fs_size"] == fs_size:
            return name
    return None


def setup(b):
    """Board b's variant, flash mode and block devices (b.meta, b.slot_a, b.slot_b)."""
    import rp2
    from board import FILES_DIR, SECTOR, FileSectors

    cfg = b.config
    fs_size = rp2.Flash().ioctl(4, 0) * SECTOR
    b.variant = cfg.get("variant") or variant_for(fs_size)
    lay = cfg.get("layout") or layouts().get(b.variant or "")
    if not lay:
        raise OSError(22, "no layout for an FS region of %d bytes" % fs_size)
    mode = cfg.get("flash_mode", "auto")
    if mode in ("auto", "raw"):
        st = os.statvfs("/")
        root = st[0] * st[2]  # block size * blocks of the mounted FS
        if root <= lay["meta"][0]:
            mode = "raw"
        elif mode == "raw":
            raise OSError(22, "raw layout, but the root FS covers the slots")
        else:
            mode = "files"
    b.mode = mode
    if mode == "raw":
        b.meta = rp2.Flash(start=lay["meta"][0], len=lay["meta"][1])
        b.slot_a = rp2.Flash(start=lay["slot_a"][0], len=lay["slot_a"][1])
        b.slot_b = rp2.Flash(start=lay["slot_b"][0], len=lay["slot_b"][1])
    else:
        b.meta = FileSectors(FILES_DIR + "m", lay["meta"][1] // SECTOR)
        b.slot_a = FileSectors(FILES_DIR + "a", lay["slot_a"][1] // SECTOR)
        b.slot_b = FileSectors(FILES_DIR + "b", lay["slot_b"][1] // SECTOR)


def unflatten(fs, room):
    """A board deployed before the subdirectories kept DIR/NNN: move those files of
    FileSectors fs (each rename is atomic, so a power cut here leaves every sector in one
    place, and the next boot moves the rest). Without `room` bytes free for the
    subdirectories the slot stays flat: slower to write, but its image stays where it is."""
    flat = [e[0] for e in os.ilistdir(fs.path)
            if e[1] == 0x8000 and len(e[0]) == 3 and e[0].isdigit()]
    if not flat:
        return
    if fs._free() < room:
        fs.sharded = False
        return
    for name in flat:
        n = int(name)
        fs._mkdir(n)
        os.rename("%s/%s" % (fs.path, name), fs._name(n))


def serial(b, spec, rx):
    """The serial link's stream for config "serial" `spec`, an rx buffer of `rx` bytes."""
    import linkcfg

    if spec == "stdin":
        return linkcfg.stdin_stream()
    import machine

    uid, tx, rx_pin, baud = linkcfg.uart_spec(spec)
    # Flash erase/program stalls IRQs for tens of ms: only the PL011's 32-byte
    # FIFO takes what arrives meanwhile. The host learns it (info uart_fifo) and
    # keeps the line quiet while a request that fills a sector is handled.
    b.uart_fifo = 32
    return machine.UART(uid, baudrate=baud, tx=machine.Pin(tx), rx=machine.Pin(rx_pin),
                        rxbuf=min(32766, max(256, rx)), txbuf=1024, timeout=0, timeout_char=0)


def udp(b):
    """The UDP socket, when config "wifi" asks for one (None otherwise)."""
    import wifi

    s = wifi.udp_socket(b.config)
    del sys.modules["wifi"]  # needed once, at boot: its code need not stay in the heap
    return s
