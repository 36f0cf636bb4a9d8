# The SMP receiver: the application-side runtime that the boot stage starts
# from the application bundle (so the receiver itself is upgradable), or from
# the device filesystem as the recovery receiver when no slot can boot.
import select
import smp
import updater
import image
import grp_os
import grp_image
import grp_meterota
import link

IDLE_MS = 500  # a link quiet this long drops any half-received packet


class Context:
    """What the groups share: the board, the updater and the device identity."""

    def __init__(self, board, up, recovery):
        cfg = board.config
        self.board = board
        self.up = up
        self.recovery = recovery
        self.device_id = cfg.get("id", "meter")
        self.board_name = board.name
        self.role = cfg.get("role", "meter")
        self.key = bytes.fromhex(cfg.get("key", "00" * 32))
        self.pubkey = cfg.get("pubkey")
        self.self_confirm = bool(cfg.get("self_confirm", False))
        self.allow_downgrade = bool(cfg.get("allow_downgrade", False))
        self.buf_size = int(cfg.get("buf_size", 2048))
        self.buf_count = int(cfg.get("buf_count", 4))
        self.reset_requested = False
        self.links = []

    def app_version(self):
        a = self.up.active
        inf = self.up.slots.info(a) if a != 0xFF else None
        return image.version_str(inf.version) if inf else "none"

    def dropped(self):
        return sum(l.dropped() for l in self.links)


def build(board, recovery=False):
    up = updater.Updater(board)
    ctx = Context(board, up, recovery)
    disp = smp.Dispatcher()
    grp_os.register(disp, ctx)
    grp_image.register(disp, up)
    grp_meterota.register(disp, ctx)
    ctx.links = board.links(ctx.buf_size)
    return ctx, disp


def self_test(ctx, app):
    """Confirm or fail a trial boot when the device confirms itself."""
    up = ctx.up
    if not (up.st.trial and ctx.self_confirm):
        return
    check = getattr(app, "selftest", None)
    try:
        ok = check() if check else True
        why = "self-test returned False"
    except Exception as e:
        ok = False
        why = "self-test raised %r" % (e,)
    if ok:
        up.confirm("self-test passed")
    else:
        up.fail_trial(why)
        ctx.board.reset()


def serve(ctx, disp, poll_hook=None):
    p = select.poll()
    for l in ctx.links:
        p.register(l.obj, select.POLLIN)
    handle = disp.handle
    while True:
        events = p.poll(IDLE_MS)
        if not events:
            for l in ctx.links:
                l.idle()
        for obj, _ev in events:
            for l in ctx.links:
                if l.obj is obj:
                    l.service(handle)
        if ctx.reset_requested:
            ctx.board.reset()
        if poll_hook:
            poll_hook()


def main(board, recovery=False):
    ctx, disp = build(board, recovery)
    app = None
    if not recovery:
        try:
            import app  # the meter application in the bundle, if any
        except ImportError as e:
            if "app" not in str(e):
                raise
            app = None
        self_test(ctx, app)
    board.ready(ctx)
    hook = getattr(app, "poll", None) if app else None
    serve(ctx, disp, hook)
