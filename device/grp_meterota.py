# meterota's own SMP group (64, a user group): device identity and slots in
# detail, the HMAC-authenticated confirmation record, and device statistics.
# Standard tools never send it; our host uses it to verify an upgrade.
from micropython import const
import gc
import image
import record
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


class MeterotaGroup:
    def __init__(self, ctx):
        self.ctx = ctx

    def info(self, req):
        c = self.ctx
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
        return {
            "id": c.device_id,
            "board": c.board_name,
            "role": c.role,
            "bootloader": BOOT_STAGE,
            "trial": st.trial,
            "boots": st.boots,
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
        }

    def record(self, req):
        c = self.ctx
        rec = record.build(c.device_id, c.up.st)
        if rec is None:
            raise GroupError(RC_NO_RECORD)
        return {"rec": rec, "mac": record.hmac_sha256(c.key, rec)}

    def stats(self, req):
        gc.collect()
        out = {"heap_free": gc.mem_free(), "heap_alloc": gc.mem_alloc(), "rx_dropped": self.ctx.dropped()}
        out.update(self.ctx.board.stats())
        return out


def register(disp, ctx):
    g = MeterotaGroup(ctx)
    disp.register(GROUP, CMD_INFO, g.info, None)
    disp.register(GROUP, CMD_RECORD, g.record, None)
    disp.register(GROUP, CMD_STATS, g.stats, None)
    return g
