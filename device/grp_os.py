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
QUERY_YIELDS_NO_ANSWER = const(3)

# Our boot stage behaves as MCUboot in direct-XIP with revert (an image runs from
# the slot it was written to, a test boot not confirmed is reverted), so it
# answers bootloader information as MCUboot does: standard clients that drive
# the MCUboot flow accept it. Its own identity is in group 64 (grp_meterota).
BOOTLOADER = "MCUboot"
BOOT_MODE_DIRECT_XIP_REVERT = const(5)  # MCUboot's enum mcuboot_mode


def v1_rc(rc):
    """Zephyr's os_mgmt_translate_error_code for SMP v1 clients."""
    if rc == INVALID_FORMAT:
        return smp.EINVAL
    if rc == QUERY_YIELDS_NO_ANSWER or rc == 4:  # 4: RTC_NOT_SET
        return smp.ENOENT
    return smp.EUNKNOWN


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
            return {"bootloader": BOOTLOADER}
        if q == "mode":
            # As Zephyr: "no-downgrade" is sent (true) only when downgrades are refused.
            if self.ctx.allow_downgrade:
                return {"mode": BOOT_MODE_DIRECT_XIP_REVERT}
            return {"mode": BOOT_MODE_DIRECT_XIP_REVERT, "no-downgrade": True}
        raise GroupError(QUERY_YIELDS_NO_ANSWER)


def register(disp, ctx):
    g = OSGroup(ctx)
    disp.register(GROUP, CMD_ECHO, g.echo, g.echo)
    disp.register(GROUP, CMD_RESET, None, g.reset)
    disp.register(GROUP, CMD_PARAMS, g.params, None)
    disp.register(GROUP, CMD_INFO, g.info, None)
    disp.register(GROUP, CMD_BOOTLOADER, g.bootloader, None)
    disp.set_v1_translation(GROUP, v1_rc)
    return g
