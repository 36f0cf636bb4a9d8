# SMP OS group (0): echo, reset, MCUmgr parameters, OS/application info,
# bootloader info.
from micropython import const
import sys
import smp
from smp import GroupError, arg

GROUP = const(0)
CMD_ECHO = const(0)
CMD_RESET = const(5)
CMD_PARAMS = const(6)
CMD_INFO = const(7)
CMD_BOOTLOADER = const(8)
INVALID_FORMAT = const(2)

BOOT_MODE_DIRECT_XIP_REVERT = const(5)  # MCUboot's name for what our boot stage does


class OSGroup:
    def __init__(self, ctx):
        self.ctx = ctx

    def echo(self, req):
        d = arg(req, "d", str)
        if d is None:
            raise smp.MgmtError(smp.EINVAL)
        return {"r": d}

    def reset(self, req):
        # Answer first; the server resets once the reply is out.
        self.ctx.reset_requested = True
        return {}

    def params(self, req):
        return {"buf_size": self.ctx.buf_size, "buf_count": self.ctx.buf_count}

    def info(self, req):
        fmt = arg(req, "format", str, "s")
        c = self.ctx
        fields = {
            "s": "MicroPython",
            "n": c.device_id,
            "r": c.app_version(),
            "v": "%d.%d.%d" % sys.implementation.version[:3],
            "b": "",
            "m": c.board_name,
            "p": sys.platform,
            "i": c.board_name,
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

    def bootloader(self, req):
        q = arg(req, "query", str)
        if q is None:
            return {"bootloader": "meterota"}
        if q == "mode":
            return {"mode": BOOT_MODE_DIRECT_XIP_REVERT, "no-downgrade": not self.ctx.allow_downgrade}
        raise GroupError(3)  # QUERY_YIELDS_NO_ANSWER


def register(disp, ctx):
    g = OSGroup(ctx)
    disp.register(GROUP, CMD_ECHO, g.echo, g.echo)
    disp.register(GROUP, CMD_RESET, None, g.reset)
    disp.register(GROUP, CMD_PARAMS, g.params, None)
    disp.register(GROUP, CMD_INFO, g.info, None)
    disp.register(GROUP, CMD_BOOTLOADER, g.bootloader, None)
    return g
