# The SMP receiver: the application-side runtime that the boot stage starts
# from the application bundle (so the receiver itself is upgradable), or from
# the device filesystem as the recovery receiver when no slot can boot.
import gc
import select
import time
import smp
import updater
import grp_image

IDLE_MS = 500  # a link quiet this long drops any half-received packet
GC_EVERY = 4096  # collect after this many bytes allocated: the heap stays in one piece (mtboot.GC_EVERY)


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
        self.pump = None
        self.role_engine = None  # the concentrator's job engine, when that is the role
        self.disp = None
        self.images = None  # the image group (grp_image.ImageGroup)
        self.ready_ms = 0  # this boot's time to ready (main)

    def busy(self):
        e = self.role_engine
        return e is not None and e.has_work()

    def dropped(self):
        return sum(l.dropped() for l in self.links)

    def stats(self, req):
        """Group 64 cmd 2: heap after a collection (what stays resident between
        requests), the most in use at the end of any request since boot (live and
        not yet collected: an upper bound of the high-water; {"reset_peak": true}
        starts it again), link and flash counts."""
        gc.collect()
        im = self.images
        out = {"heap_free": gc.mem_free(), "heap_alloc": gc.mem_alloc(), "heap_peak": self.disp.heap_peak,
               "rx_dropped": self.dropped(), "inflate_bytes": im.inflated, "inflate_us": im.inflate_us}
        out.update(self.board.stats())
        if req.get("reset_peak"):
            self.disp.heap_peak = 0  # measure the next requests' high-water on their own
        return out


def os_v1_rc(rc):
    """Zephyr's os_mgmt_translate_error_code for SMP v1 clients (grp_os's codes:
    2 INVALID_FORMAT, 3 QUERY_YIELDS_NO_ANSWER, 4 RTC_NOT_SET)."""
    if rc == 2:
        return smp.EINVAL
    if rc == 3 or rc == 4:
        return smp.ENOENT
    return smp.EUNKNOWN


def echo(req):
    """SMP OS echo (group 0 command 0)."""
    d = smp.arg(req, "d", str)
    if d is None:
        raise smp.MgmtError(smp.EINVAL)
    return {"r": d}


def build(board, recovery=False):
    gc.collect()  # the buffers below live as long as the receiver: give them a clean heap
    up = updater.Updater(board)
    ctx = Context(board, up, recovery)
    disp = smp.Dispatcher()
    ctx.disp = disp
    # The OS group and most of meterota's are loaded per request (register_lazy).
    smp.call_lazy("grp_os", "register", disp, ctx)
    disp.register(smp.GROUP_OS, 0, echo, echo)  # resident: hosts time it to measure the link
    disp.set_v1_translation(smp.GROUP_OS, os_v1_rc)
    images = grp_image.register(disp, up)
    ctx.images = images
    smp.call_lazy("grp_meterota", "register", disp, ctx)
    disp.register(smp.GROUP_METEROTA, 2, ctx.stats, None)  # CMD_STATS
    if board.config.get("multicast", True) is not False and not recovery:
        _multicast(disp, images)
    extend = getattr(board, "register", None)
    if extend is not None:
        extend(disp, ctx, images)  # a board's own image kinds (ESP32: native firmware)
    ctx.links = board.links(ctx.buf_size)
    if ctx.role == "concentrator" and not recovery:
        import concentrator

        ctx.role_engine = concentrator.register(disp, ctx)
    gc.collect()
    gc.threshold(GC_EVERY)
    return ctx, disp


def _multicast(disp, images):
    """Multicast image sessions (group 64 cmds 4, 5): device/mcast.py is loaded
    by the first well-formed announce, so a meter that never hears one pays no heap."""
    box = []

    def rx():
        if not box:
            import mcast

            box.append(mcast.Receiver(disp, images))
        return box[0]

    def announce(req):
        if not (isinstance(req.get("sid"), int) and isinstance(req.get("len"), int) and req.get("bs") == 1024):
            raise smp.MgmtError(smp.EINVAL)
        return rx().announce(req)

    def block(req):
        # A malformed request is answered EINVAL like any other; a well-formed
        # block never is (on a shared medium a hundred replies would follow it).
        if not (isinstance(req.get("s"), int) and isinstance(req.get("o"), int)
                and isinstance(req.get("d"), (bytes, bytearray, memoryview))):
            raise smp.MgmtError(smp.EINVAL)
        return box[0].block(req) if box else None

    disp.register(64, 4, lambda req: rx().status(req) if box else {"sid": -1}, announce)
    disp.register(64, 5, None, block)


def self_test(ctx, app):
    """Confirm or fail a trial boot when the device confirms itself."""
    up = ctx.up
    if not (up.st.trial and ctx.self_confirm):
        return
    why = updater.app_selftest(app)
    if why is None:
        up.confirm("self-test passed")
    else:
        up.fail_trial(why)
        ctx.board.reset()


class Pump:
    """Services the upstream links for up to `ms`; the serve loop and any
    long-running work (the concentrator talking to its meters) call it, so the
    device keeps answering its host while it waits on something else."""

    def __init__(self, ctx, disp):
        self.ctx = ctx
        self._handle = disp.handle
        # Boards with a watchdog armed for the trial boot feed it here: every
        # wait of the receiver goes through the pump, at least every IDLE_MS,
        # and every request handled. A link's service drains all the frames its
        # stream holds, and an RP2040's watchdog, once armed, stays armed after
        # the confirm: a few slow requests in one service must not reset it.
        self.feed = getattr(ctx.board, "feed", None)
        self.handle = self._handle if self.feed is None else self._fed
        self.p = select.poll()
        for l in ctx.links:
            self.p.register(l.obj, select.POLLIN)

    def _fed(self, frame, origin=None):
        self.feed()
        return self._handle(frame, origin)

    def __call__(self, ms, extra=None):
        """Returns True when `extra` (another pollable) became readable."""
        ctx = self.ctx
        if self.feed is not None:
            self.feed()
        if extra is not None:
            self.p.register(extra, select.POLLIN)
        ready = False
        try:
            events = self.p.poll(ms)
            if not events and extra is None:
                for l in ctx.links:
                    l.idle()
            for obj, _ev in events:
                if obj is extra:
                    ready = True
                    continue
                for l in ctx.links:
                    if l.obj is obj:
                        try:
                            l.service(self.handle)
                        except MemoryError:
                            gc.collect()  # the request is lost, like a dropped frame; the host retries
        finally:
            if extra is not None:
                self.p.unregister(extra)
        if ctx.reset_requested:
            ctx.board.reset()
        return ready


def serve(ctx, disp, hooks=()):
    pump = Pump(ctx, disp)
    ctx.pump = pump
    while True:
        pump(IDLE_MS if not ctx.busy() else 0)
        for h in hooks:
            h()


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
    # How long this boot took to answer (from the board's start, not counting the ROM and
    # the firmware's own start): the host's reset wait follows it (meterota.upgrade.reset_wait).
    t0 = getattr(board, "t0", None)
    ctx.ready_ms = time.ticks_diff(time.ticks_ms(), t0) if t0 is not None else 0
    hooks = []
    if ctx.role_engine is not None:
        hooks.append(ctx.role_engine.poll)
    hook = getattr(app, "poll", None) if app else None
    if hook:
        hooks.append(hook)
    serve(ctx, disp, hooks)
