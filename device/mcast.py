# The meter's side of a multicast image session (user group 64, cmds 4 and 5).
#
# The concentrator announces the image to each meter by unicast (session id,
# len, SHA-256, the MCUboot header, block size): that opens -- or resumes, for
# the same image -- the ordinary upload session of the free slot (the image
# group's own checks: header, size, version policy). Then every block goes
# once over the medium to all meters, 1 KiB blocks and after each 4 KiB sector
# a parity block (the XOR of its blocks). A meter programs each block it hears
# straight into its free slot (the sector erased before its first block) and
# marks it in the same progress map as a unicast upload (upload.BLOCK); with one
# block of a sector lost, the parity rebuilds it in the upload's sector buffer
# from the others read back. After the pass the concentrator reads each
# member's progress map and broadcasts repair packets, each the XOR of a set S
# of blocks ("x": their block numbers, "o": -1 so a receiver without them
# drops it as out of range) chosen so that no member misses two of S: a meter
# missing exactly one reads the others back from its slot (programmed blocks and
# hashed sectors alike, per the map), XORs and programs it like any block; one
# missing none ignores it, one missing two drops it. Blocks it cannot place
# (another session, another sender, a wrong size or offset, a block already in
# flash, a unicast upload holding the sector buffer) are dropped without a
# reply. The unicast repair
# resumes the same session: it rebuilds the hashes from flash and sends only
# what is missing; the image becomes testable only through the image group's
# end checks (MCUboot hash read back from flash, the announced SHA-256).
from micropython import const
import upload
from upload import BLOCK, SECTOR
from smp import GroupError, MgmtError, arg
import smp

GROUP = const(64)
CMD_ANNOUNCE = const(4)
CMD_BLOCK = const(5)
XMAX = const(32)  # blocks in one repair packet at most: bounds a meter's read-back (31 KiB)

_BYTES = (bytes, bytearray, memoryview)


class Receiver:
    def __init__(self, disp, images):
        self.disp = disp
        self.images = images  # grp_image.ImageGroup of the A/B slots
        self.sid = None
        self.origin = None
        self.length = 0
        self.sha = b""
        self.blocks = 0  # blocks taken
        self.dropped = 0  # blocks refused
        self.rebuilt = 0  # blocks rebuilt from a sector's parity block
        self.xrep = 0  # blocks rebuilt from a repair packet (XOR of blocks of several sectors)

    def announce(self, req):
        sid = arg(req, "sid", int)
        length = arg(req, "len", int)
        sha = arg(req, "sha", _BYTES)
        hdr = arg(req, "hdr", _BYTES)
        bs = arg(req, "bs", int)
        if sid is None or length is None or sha is None or len(sha) != 32 or hdr is None or bs != BLOCK:
            raise MgmtError(smp.EINVAL)
        g = self.images
        g.cur = g
        self.sid = None
        r = g._first({"off": 0, "len": length, "sha": sha, "image": 0}, hdr)
        s = g.session
        if r is None:
            r = {"off": s.off}
        if s.state == upload.RUNNING:
            self.sid = sid
            self.origin = self.disp.origin
            self.length = length
            self.sha = bytes(sha)
            if sid != getattr(self, "_last_sid", None):
                self.blocks = self.dropped = self.rebuilt = self.xrep = 0
            self._last_sid = sid
        r["sid"] = sid
        return r

    def status(self, req):
        s = self.images.session
        r = {"sid": self.sid if self.sid is not None else -1, "off": s.off, "blocks": self.blocks,
             "rebuilt": self.rebuilt, "xrep": self.xrep, "dropped": self.dropped}
        if s.state == upload.RUNNING and self.sid is not None:
            # The progress map of the session's sectors: what a second round should resend.
            m = bytearray(min((s.length + SECTOR - 1) // SECTOR, SECTOR - upload.MAP_AT))
            s.meta.readblocks(s.msec, m, upload.MAP_AT)
            r["map"] = m
        return r

    def block(self, req):
        try:
            r = self._block(req)
            if r:
                self.blocks += 1
            elif r is not None:
                self.dropped += 1
        except (TypeError, ValueError, KeyError, OSError, GroupError, MgmtError):
            self.dropped += 1
        return None  # blocks are never answered: a hundred replies would fill the medium

    def _block(self, req):
        s = self.images.session
        off = req.get("o")
        d = req.get("d")
        if self.sid is None or req.get("s") != self.sid or self.disp.origin != self.origin:
            return False
        if not isinstance(off, int) or not isinstance(d, _BYTES):
            return False
        if s.state != upload.RUNNING or s.length != self.length or s.sha != self.sha:
            return False  # the session was replaced or ended
        if s.off != s.flushed and not s.need_rehash:
            return False  # a unicast upload has data in the sector buffer
        x = req.get("x")
        if x is not None:
            return self._xor(s, x, d)
        if off < 0 or off >= s.length or off % BLOCK:
            return False
        k = off // SECTOR
        if k * SECTOR < s.off:
            return None  # in flash and hashed already
        m = s.mapped(k)
        used = min(SECTOR, s.length - k * SECTOR)
        nb = (used + BLOCK - 1) // BLOCK
        if req.get("p"):
            return self._parity(s, k, m, used, nb, d, off)
        if len(d) != min(BLOCK, s.length - off):
            return False
        b = (off - k * SECTOR) // BLOCK
        if not (m >> b) & 1:
            return None  # in flash already (a repeat, or rebuilt from the parity)
        s.put_block(k, off - k * SECTOR, d)
        return True

    def _parity(self, s, k, m, used, nb, d, off):
        # The XOR of the sector's blocks (the last one zero-padded): rebuilds
        # the one block missing, in the sector buffer, from the others in flash.
        if off != k * SECTOR or len(d) != BLOCK:
            return False
        miss = [b for b in range(nb) if (m >> b) & 1]
        if len(miss) != 1:
            return None if not miss else False  # nothing to rebuild, or too much lost for one parity
        x = int.from_bytes(d, "big")
        mv = s.mv
        s.lent = self
        for b in range(nb):
            if b != miss[0]:
                n = min(BLOCK, used - b * BLOCK)
                blk = mv[b * BLOCK:(b + 1) * BLOCK]
                s.slot.readinto(k * SECTOR + b * BLOCK, blk[:n])
                for j in range(n, BLOCK):
                    blk[j] = 0
                x ^= int.from_bytes(blk, "big")
        b = miss[0]
        n = min(BLOCK, used - b * BLOCK)
        mv[b * BLOCK:(b + 1) * BLOCK] = x.to_bytes(BLOCK, "big")
        s.put_block(k, b * BLOCK, mv[b * BLOCK:b * BLOCK + n])
        s.lent = None
        self.rebuilt += 1
        return True


    def _xor(self, s, x, d):
        # A repair packet: d is the XOR of the blocks numbered in x (each
        # zero-padded to BLOCK). Which of them are in flash is the progress
        # map's say only (a block below `off` is in flash too, and mapped so).
        if not isinstance(x, list) or not 0 < len(x) <= XMAX or len(d) != BLOCK:
            return False
        nblk = (s.length + BLOCK - 1) // BLOCK
        miss = -1
        last = -1
        for i in x:
            if not isinstance(i, int) or i <= last or i >= nblk:
                return False  # out of order, repeated or past the end: not the concentrator's
            last = i
            m = s.mapped(i * BLOCK // SECTOR)
            if m == 0xFF or (m >> (i % (SECTOR // BLOCK))) & 1:
                if miss >= 0:
                    return False  # two missing: cannot be rebuilt from this one
                miss = i
        if miss < 0:
            return None  # all in flash already
        acc = int.from_bytes(d, "big")
        blk = s.mv[:BLOCK]
        s.lent = self
        for i in x:
            if i != miss:
                n = min(BLOCK, s.length - i * BLOCK)
                s.slot.readinto(i * BLOCK, blk[:n])
                for j in range(n, BLOCK):
                    blk[j] = 0
                acc ^= int.from_bytes(blk, "big")
        blk[:] = acc.to_bytes(BLOCK, "big")
        n = min(BLOCK, s.length - miss * BLOCK)
        for j in range(n, BLOCK):
            if blk[j]:
                s.lent = None
                return False  # the padding of the last block is not zero: forged
        k = miss * BLOCK // SECTOR
        s.put_block(k, miss * BLOCK - k * SECTOR, blk[:n])
        s.lent = None
        self.xrep += 1
        return True


def register(disp, images):
    """Register eagerly (receiver._multicast registers lazily, loading this on
    the first announce)."""
    r = Receiver(disp, images)
    disp.register(GROUP, CMD_ANNOUNCE, r.status, r.announce)
    disp.register(GROUP, CMD_BLOCK, None, r.block)
    return r
