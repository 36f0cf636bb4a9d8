# What the ESP32's board does once, at boot: find its meta area and slots (the
# meterota partitions, or windows carved from the end of `vfs`: the "stock" layout,
# board.py says why) and open its links. board.py imports it for that and drops it: on
# stock firmware a module's bytecode lives in the heap, and none of this runs again
# while the receiver serves. The host reads stock_layout too (meterota.deploy).
import sys

SECTOR = 4096
# Mirrors layout.json "stock" (the host reads the JSON, the device this).
STOCK = {"meta_size": 16384, "slot_size": 524288, "slot_min": 262144, "fs_min": 131072}


def stock_layout(vfs_size, lay=None):
    """The stock layout inside a `vfs` partition of vfs_size bytes, as
    vfs-relative (offset, size) pairs: FAT at the front, then meta, A, B up to
    the partition's end. Slots shrink (not below slot_min) so the FS keeps at
    least fs_min; returns None when the partition is too small."""
    lay = lay or STOCK
    meta = lay["meta_size"]
    room = (vfs_size - meta - lay["fs_min"]) // 2 // SECTOR * SECTOR
    slot = min(lay["slot_size"], room)
    if slot < lay["slot_min"]:
        return None
    b = vfs_size - slot
    a = b - slot
    m = a - meta
    return {"fs": (0, m), "meta": (m, meta), "slot_a": (a, slot), "slot_b": (b, slot)}


def _find(label):
    import esp32

    P = esp32.Partition
    found = P.find(P.TYPE_DATA, label=label)
    return found[0] if found else None


def setup(bd):
    """Board bd's layout and block devices (bd.meta, bd.slot_a, bd.slot_b)."""
    from board import Sub

    lay = bd.config.get("layout") or {}
    meta = _find("mtr_meta")
    a = _find("mtr_a")
    b = _find("mtr_b")
    if meta and a and b:
        bd.layout = "partitions"
        bd.meta, bd.slot_a, bd.slot_b = meta, a, b
        return
    vfs = _find("vfs")
    if vfs is None:
        raise OSError(2, "no mtr_* partitions and no vfs partition")
    size = vfs.info()[3]
    st = lay.get("stock") if isinstance(lay.get("stock"), dict) else None
    carve = stock_layout(size, st)
    if carve is None:
        raise OSError(28, "vfs partition too small for the stock layout")
    bd.layout = "stock"
    bd.vfs = vfs
    bd.fs_window = carve["fs"]
    bd.meta = Sub(vfs, *carve["meta"])
    bd.slot_a = Sub(vfs, *carve["slot_a"])
    bd.slot_b = Sub(vfs, *carve["slot_b"])


def serial(bd, spec, rx):
    """The serial link's stream for config "serial" `spec`, an rx buffer of `rx` bytes."""
    import linkcfg

    if spec == "stdin":
        import os

        try:
            os.dupterm(None)  # detach a WebREPL/UART mirror from the console
        except (AttributeError, OSError):
            pass
        return linkcfg.stdin_stream()
    import machine

    uid, tx, rx_pin, baud = linkcfg.uart_spec(spec)
    bd.uart_fifo = 128  # the UART's RX FIFO: all that a flash write's cache-off time keeps
    return machine.UART(uid, baudrate=baud, tx=tx, rx=rx_pin,
                        rxbuf=max(256, rx), txbuf=1024, timeout=0, timeout_char=0)


def udp(bd):
    """The UDP socket, when config "wifi" asks for one (None otherwise)."""
    import wifi

    s = wifi.udp_socket(bd.config)
    del sys.modules["wifi"]  # needed once, at boot: its code need not stay in the heap
    return s
