# SMP OS group (0): reset, MCUmgr parameters, OS/application info, bootloader
# info. Loaded for each request and released after (receiver.build registers it
# with smp.Dispatcher.register_lazy): handlers are fn(ctx, req). Echo is the
# receiver's own (resident): hosts time it to measure the link.
from micropython import const
import sys
import smp
from smp import GroupError, arg

GROUP = const(0)
CMD_RESET = const(5)
CMD_PARAMS = const(6)
CMD_INFO = const(7)
CMD_BOOTLOADER = const(8)
INVALID_FORMAT = const(2)

BOOT_MODE_DIRECT_XIP_REVERT = const(5)  # MCUboot's name for what our boot stage does


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
        return {"bootloader": "meterota"}
    if q == "mode":
        return {"mode": BOOT_MODE_DIRECT_XIP_REVERT, "no-downgrade": not ctx.allow_downgrade}
    raise GroupError(3)  # QUERY_YIELDS_NO_ANSWER


def register(disp, ctx):
    m = "grp_os"
    disp.register_lazy(GROUP, CMD_RESET, m, None, "reset", ctx)
    disp.register_lazy(GROUP, CMD_PARAMS, m, "params", None, ctx)
    disp.register_lazy(GROUP, CMD_INFO, m, "info", None, ctx)
    disp.register_lazy(GROUP, CMD_BOOTLOADER, m, "bootloader", None, ctx)
