# SMP image management group (1): state read/write, upload, erase, with the
# standard IMG_MGMT_ERR codes so smpmgr/smpclient understand every refusal.
from micropython import const
import deflate
import io  # an extensible built-in: an import inside a function searches sys.path each time
import smp
import image
import upload
import time
from smp import GroupError, MgmtError, arg

GROUP = const(1)
CMD_STATE = const(0)
CMD_UPLOAD = const(1)
CMD_ERASE = const(5)

UNKNOWN = const(1)
NO_IMAGE = const(3)
NO_TLVS = const(4)
HASH_NOT_FOUND = const(8)
NO_FREE_SLOT = const(9)
FLASH_WRITE_FAILED = const(12)
INVALID_SLOT = const(14)
INVALID_LENGTH = const(21)
INVALID_IMAGE_HEADER = const(22)
INVALID_IMAGE_HEADER_MAGIC = const(23)
INVALID_HASH = const(24)
CURRENT_VERSION_IS_NEWER = const(27)
IMAGE_ALREADY_PENDING = const(28)
INVALID_IMAGE_VECTOR_TABLE = const(29)  # the payload is not what this image number runs
INVALID_IMAGE_TOO_LARGE = const(30)
INVALID_IMAGE_DATA_OVERRUN = const(31)
IMAGE_CONFIRMATION_DENIED = const(32)
IMAGE_SETTING_TEST_TO_ACTIVE_DENIED = const(33)

# The upload's `image` number, as smpmgr --slot N sends it (MCUboot's serial
# recovery numbering: 0 = default, then two numbers per image, one per slot).
# Image 0 (0, 1, 2) is the application bundle: all go to the free A/B slot.
# Image 1 (3, 4) is a board's native firmware (ESP32: the next OTA app
# partition), when the board registers it; otherwise ENOTSUP.
APP_IMAGES = (0, 1, 2)
FIRMWARE_IMAGES = (3, 4)
BUSY_MS = const(10000)  # an upload idle this long may be taken over by another client

_BYTES = (bytes, bytearray, memoryview)
NO_FREE_MEMORY = const(15)

GROUP_METEROTA = const(64)
CMD_UPLOAD_DEFLATED = const(3)  # meterota's compressed upload (user group 64)
DEFLATE_WBITS = const(9)  # 512-byte window: what a small device can afford
DEFLATE_BLOCK = const(4096)  # raw bytes per request at most


def _v1(rc):
    """Zephyr's translation of image errors for SMP v1 clients (imgerr.v1_rc):
    an error path, so its table is loaded only when a v1 client needs it."""
    return smp.call_lazy("imgerr", "v1_rc", rc)


class ImageGroup:
    """The upload protocol into a slot table; this class fills the free A/B
    slot, the concentrator's StoreUpload (same protocol) fills its image store,
    a board's firmware group (boards/esp32/fw_image.py) the next OTA partition."""

    def __init__(self, up, disp, session=None, table=None):
        self.up = up
        self.session = session or up.session
        self.table = table or up.slots
        self.disp = disp  # for the origin of the request: one uploader at a time
        self.owner = None
        self.last = 0
        self.others = []  # [(upload image numbers, group)]: other image kinds (add_image)
        self.cur = self  # the group of the upload in progress: continuations carry no `image`
        self.inflated = 0  # raw bytes inflated since boot, and the time it took:
        self.inflate_us = 0  # the board's inflate rate, which hosts weigh against the link's

    def add_image(self, numbers, group):
        """Serve another image kind (its own slots, session and checks) through
        this group's commands: uploads with `image` in `numbers`, state read and
        write, erase of slots 2 and 3."""
        self.others.append((numbers, group))

    def _groups(self):
        return [self] + [g for _n, g in self.others]

    def _route(self, n):
        if n in APP_IMAGES:
            return self
        for numbers, g in self.others:
            if n in numbers:
                return g
        if n in FIRMWARE_IMAGES:
            raise MgmtError(smp.ENOTSUP)  # no native firmware slots on this board
        raise GroupError(INVALID_SLOT)

    # -- what a group reports and does for its own slots --------------------
    # (state requests only, which run with device/imgstate.py loaded)
    def state_images(self):
        import imgstate

        return imgstate.slots_images(self.up)

    def test(self, i, permanent):
        import imgstate

        imgstate.slots_test(self.up, i, permanent)

    def on_trial(self):
        return bool(self.up.st.trial)

    def find_hash(self, h):
        return self.table.find_hash(h)

    def confirm_running(self):
        self.up.confirm()

    def erase_slot(self, logical):
        import imgstate

        imgstate.slots_erase(self.up, self.up.active if logical == 0 else self.up.other)

    # State read/write and erase come a few times per upgrade: their code is
    # loaded for the request and released after (device/imgstate.py).
    def state_read(self, req):
        return smp.call_lazy("imgstate", "read", self, req)

    def state_write(self, req):
        return smp.call_lazy("imgstate", "write", self, req)

    def erase(self, req):
        return smp.call_lazy("imgstate", "erase", self, req)

    def upload_deflated(self, req):
        """Like upload, but `data` is one raw-deflate block (window 2^9) that
        inflates to `rlen` bytes at `off`; the same session, checks and replies.
        The block inflates straight into the session's sector buffer where it
        lands (no buffer of its own) when it continues the session within one
        4 KiB sector, as the host cuts blocks; any other block (a first chunk
        over a session holding unflushed bytes, one that crosses a sector)
        inflates into a buffer that lives for this request only."""
        rlen = arg(req, "rlen", int)
        data = arg(req, "data", _BYTES)
        off = arg(req, "off", int)
        if rlen is None or data is None or off is None or rlen < 0 or rlen > DEFLATE_BLOCK:
            raise MgmtError(smp.EINVAL)
        g = self._pick(req)
        room = getattr(g.session, "room", None)
        out = room(off, rlen) if room is not None else None
        if out is None:
            out = memoryview(bytearray(rlen))
        t0 = time.ticks_us()
        d = deflate.DeflateIO(io.BytesIO(data), deflate.RAW, DEFLATE_WBITS)
        try:
            n = d.readinto(out)
            if n == rlen and d.read(1):
                n = -1  # more data than announced
        except (OSError, EOFError, ValueError):
            n = -1  # truncated or corrupt stream
        d = None  # the inflater's state and window go before the write
        if n == rlen:
            self.inflated += n
            self.inflate_us += time.ticks_diff(time.ticks_us(), t0)
        if n != rlen:
            raise MgmtError(smp.EINVAL)  # corrupt or mis-sized block: nothing is written
        req["data"] = out
        try:
            return g._upload(req)
        except GroupError as e:
            e.group = GROUP
            raise

    # -- what differs between the A/B slots and another target --------------
    # (and, in imgcheck.py, the A/B slots' admission and verdict, which another
    # kind replaces with its own `_admit(target, hdr, req)` and `_accept(info)`)
    def _target(self):
        return self.up.other

    def _claim(self, same_image):
        """Refuse with EBUSY a second client while an upload is alive; a client
        presenting the same image (sha and len) may take the session over."""
        s = self.session
        now = time.ticks_ms()
        origin = self.disp.origin
        if (s.state == upload.RUNNING and self.owner is not None and origin != self.owner
                and not same_image and time.ticks_diff(now, self.last) < BUSY_MS):
            raise MgmtError(smp.EBUSY)
        self.owner = origin
        self.last = now

    def upload(self, req):
        return self._pick(req)._upload(req)

    def _pick(self, req):
        """The group a request goes to: a first chunk by its `image` number, a
        continuation to the upload in progress (of the requester, if it has one)."""
        off = arg(req, "off", int)
        if off == 0:
            g = self._route(arg(req, "image", int, 0))
            self.cur = g
            return g
        g = self.cur
        origin = self.disp.origin
        if g.owner != origin:
            for o in self._groups():
                if o.owner == origin and o.session.state == upload.RUNNING:
                    return o
        return g

    def _upload(self, req):
        off = arg(req, "off", int)
        data = arg(req, "data", _BYTES)
        if off is None or data is None or off < 0:
            raise MgmtError(smp.EINVAL)
        s = self.session
        if off == 0:
            r = self._first(req, data)
            if r is not None:
                return r
        else:
            last = self.owner
            self._claim(False)
            if s.state != upload.RUNNING:
                if s.state == upload.DONE and last == self.disp.origin and off + len(data) == s.length:
                    # The reply to the last chunk was lost (its read-back takes seconds on a
                    # slow board) and the uploader sent it again: the image is in, verified.
                    return {"off": s.length, "match": True} if s.sha else {"off": s.length}
                return {"off": 0}  # no session: the client must start over
            if s.need_rehash:
                s.rehash()
            if off != s.off:
                return {"off": s.off}  # not an error: the server's off drives the client
        if off + len(data) > s.length:
            raise GroupError(INVALID_IMAGE_DATA_OVERRUN)
        try:
            s.write(data)
        except OSError:
            s.mark_failed()
            self.table.busy = -1
            raise GroupError(FLASH_WRITE_FAILED)
        if s.off < s.length:
            return {"off": s.off}
        return self._finish()

    # The first chunk and the end of an upload come once per image: their
    # checks live in device/imgcheck.py, loaded for the call and released after.
    def _first(self, req, data):
        return smp.call_lazy("imgcheck", "first", self, req, data)

    def _finish(self):
        return smp.call_lazy("imgcheck", "finish", self)


def register(disp, up):
    g = ImageGroup(up, disp)
    disp.register(GROUP, CMD_STATE, g.state_read, g.state_write)
    disp.register(GROUP, CMD_UPLOAD, None, g.upload)
    disp.register(GROUP, CMD_ERASE, None, g.erase)
    disp.register(GROUP_METEROTA, CMD_UPLOAD_DEFLATED, None, g.upload_deflated)
    disp.set_v1_translation(GROUP, _v1)
    return g
