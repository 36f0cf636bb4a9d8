# meterota's own SMP group (64, a user group): device identity and slots in
# detail, the HMAC-authenticated confirmation record, and device statistics.
# Standard tools never send it; our host uses it to verify an upgrade.
# Loaded for each request and released after (smp.Dispatcher.register_lazy).
from micropython import const
import image
from smp import GroupError

GROUP = const(64)
CMD_INFO = const(0)
CMD_RECORD = const(1)
CMD_STATS = const(2)

# rc values of this group (v2 err {group: 64, rc})
RC_NO_RECORD = const(2)

FRAMINGS = ("console", "binary")
BOOT_STAGE = "meterota"  # what really boots; the OS group answers as MCUboot (grp_os)
FEATURES = ("deflate",)  # group 64 cmd 3: compressed upload


def info(c, req):
    up = c.up
    st = up.st
    slots = []
    for i in (0, 1):
        s = up.slots[i]
        inf = up.slots.info(i)
        e = {"slot": s.name, "size": s.size, "active": i == st.active}
        if inf is not None:
            e["version"] = image.version_full(inf.version)
            e["hash"] = inf.hash
            e["bootable"] = inf.bootable
        e["pending"] = st.pending == i
        slots.append(e)
    if req.get("brief"):
        # What a concentrator polls for on a slow shared medium (the boot, the
        # slots, the trial): half the bytes of the full answer.
        return {"trial": st.trial, "boots": st.boots, "self_confirm": c.self_confirm, "slots": slots}
    return {
        "id": c.device_id,
        "board": c.board_name,
        "role": c.role,
        "bootloader": BOOT_STAGE,
        "trial": st.trial,
        "boots": st.boots,
        "ready_ms": c.ready_ms,  # this boot's time from the board's start to answering
        "revert_reason": st.revert_reason,
        "slots": slots,
        "framings": FRAMINGS,
        "features": FEATURES,
        "buf_size": c.buf_size,
        "buf_count": c.buf_count,
        "recovery": c.recovery,
        "self_confirm": c.self_confirm,
        "signed_only": c.pubkey is not None,
        "upload": {"state": up.session.state, "off": up.session.off, "len": up.session.length},
        "inflate_bps": _inflate_bps(c.images),
        # A UART without flow control: bytes beyond its hardware FIFO are lost while
        # a flash erase/program stalls the board (0: USB CDC or a socket, flow-controlled).
        "uart_fifo": getattr(c.board, "uart_fifo", 0),
    }


def _inflate_bps(g):
    """Raw bytes/s this board inflated at since boot (0: nothing inflated yet)."""
    if g is None or g.inflate_us <= 0 or g.inflated < 4096:
        return 0
    return g.inflated * 1000000 // g.inflate_us


def conf_record(c, req):
    import record

    rec = record.build(c.device_id, c.up.st)
    if rec is None:
        raise GroupError(RC_NO_RECORD)
    return {"rec": rec, "mac": record.hmac_sha256(c.key, rec)}


def register(disp, ctx):
    # Loaded for each request and released after; the statistics (cmd 2) are
    # the receiver's own (receiver.Context.stats), so that they do not count
    # this module's code in the heap they report.
    disp.register_lazy(GROUP, CMD_INFO, "grp_meterota", "info", None, ctx)
    disp.register_lazy(GROUP, CMD_RECORD, "grp_meterota", "conf_record", None, ctx)
