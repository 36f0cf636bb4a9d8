# SMP OS group (0): reset, MCUmgr parameters, OS/application info, bootloader
# info. Loaded for each request and released after (receiver.build registers it
# with smp.Dispatcher.register_lazy): handlers are fn(ctx, req). Echo and the
# group's SMP v1 error translation are the receiver's own (resident): hosts time
# echo to measure the link, and a translation kept here would keep this module.
from micropython import const
import sys
from smp import GroupError, arg

GROUP = const(0)
CMD_RESET = const(5)
CMD_PARAMS = const(6)
CMD_INFO = const(7)
CMD_BOOTLOADER = const(8)
INVALID_FORMAT = const(2)  # receiver.os_v1_rc translates these
QUERY_YIELDS_NO_ANSWER = const(3)

# Our boot stage behaves as MCUboot in direct-XIP with revert (an image runs from
# the slot it was written to, a test boot not confirmed is reverted), so it
# answers bootloader information as MCUboot does: standard clients that drive
# the MCUboot flow accept it. Its own identity is in group 64 (grp_meterota).
BOOTLOADER = "MCUboot"
BOOT_MODE_DIRECT_XIP_REVERT = const(5)  # MCUboot's enum mcuboot_mode


def reset(ctx, req):
    # Answer first; the server resets once the reply is out.
    ctx.reset_requested = True
    return {}


def params(ctx, req):
    return {"buf_size": ctx.buf_size, "buf_count": ctx.buf_count}


def _app_version(ctx):
    import image

    up = ctx.up
    a = up.active
    inf = up.slots.info(a) if a != 0xFF else None
    return image.version_str(inf.version) if inf else "none"


def info(ctx, req):
    fmt = arg(req, "format", str, "s")
    fields = {
        "s": "MicroPython",
        "n": ctx.device_id,
        "r": _app_version(ctx),
        "v": "%d.%d.%d" % sys.implementation.version[:3],
        "b": "",
        "m": ctx.board_name,
        "p": sys.platform,
        "i": ctx.board_name,
        "o": "meterota",
    }
    if "a" in fmt:
        fmt = "snrvbmpio"
    out = []
    for ch in fmt:
        v = fields.get(ch)
        if v is None:
            raise GroupError(INVALID_FORMAT)
        if v:
            out.append(v)
    return {"output": " ".join(out)}


def bootloader(ctx, req):
    q = arg(req, "query", str)
    if q is None:
        return {"bootloader": BOOTLOADER}
    if q == "mode":
        # As Zephyr: "no-downgrade" is sent (true) only when downgrades are refused.
        if ctx.allow_downgrade:
            return {"mode": BOOT_MODE_DIRECT_XIP_REVERT}
        return {"mode": BOOT_MODE_DIRECT_XIP_REVERT, "no-downgrade": True}
    raise GroupError(QUERY_YIELDS_NO_ANSWER)


def register(disp, ctx):
    m = "grp_os"
    disp.register_lazy(GROUP, CMD_RESET, m, None, "reset", ctx)
    disp.register_lazy(GROUP, CMD_PARAMS, m, "params", None, ctx)
    disp.register_lazy(GROUP, CMD_INFO, m, "info", None, ctx)
    disp.register_lazy(GROUP, CMD_BOOTLOADER, m, "bootloader", None, ctx)
