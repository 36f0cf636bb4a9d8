# The concentrator role: the same receiver, plus user group 65 for its meters
# and a job engine that upgrades them through their own SMP receivers.
#
# Upstream (head-end): list meters; store one meter image (flash, same upload
# protocol as a slot); create / read / cancel jobs (targets, priority, retries,
# duration, optional window); read per-meter results with each meter's own
# confirmation record relayed unchanged (its HMAC is the meter's: we cannot
# forge it). Jobs and results are appended to a flash log, so a reboot mid-job
# resumes without re-flashing meters that finished.
from micropython import const
import gc
import socket
import struct
import time
import cbor
import slots
import upload
import smp
import grp_image
import joblog
import smpc
from smp import GroupError, MgmtError, arg
from smpc import PeerTimeout, PeerError, OP_READ, OP_WRITE

GROUP = const(65)
CMD_METERS = const(0)
CMD_STORE = const(1)
CMD_STORE_INFO = const(2)
CMD_JOB_CREATE = const(3)
CMD_JOB_STATUS = const(4)
CMD_JOB_CANCEL = const(5)
CMD_JOB_RESULTS = const(6)

RC_NO_IMAGE = const(2)  # no stored image, or not the one named
RC_NO_JOB = const(3)
RC_BAD_TARGET = const(4)  # a target id that is not one of our meters
RC_STORE_BUSY = const(5)  # a job still uses the stored image

META_STORE_SESSION = const(3)  # meta sector of the image store's upload session
CHUNK = const(1024)  # bytes of image per multicast block (upload.BLOCK), and per request to a meter that heard one
UCHUNK = const(1952)  # bytes of image per unicast request at most (a 2 KiB buf_size meter's, less the SMP overhead)
WMAX = const(4)  # upload requests in flight to one meter at most (and its buf_count)
KMAX = const(64)  # meters worked on at once at most (config `parallel`, job `parallel`), and as the heap allows:
SLOT_HEAP = const(6144)  # heap a busy slot takes (its flow, its requests in flight, replies, their garbage)
HEAP_RESERVE = const(131072)  # heap kept for the host's requests and everything else
_CHUNK_HDR = const(26)  # SMP header + {"off": u32, "data": bstr16} before the data
_BLOCK_HDR = const(32)  # SMP header + {"s", "o", ["p"], "d"} before a multicast block's data
XMAX = const(32)  # blocks XORed into one repair packet at most (mcast.XMAX): a meter's read-back stays bounded
_X_HDR = const(2 + 3 + 2 + 5 * XMAX)  # its "x": [block numbers] at most (uint32 each), beyond _BLOCK_HDR
MC_OVERHEAD = const(32)  # bytes of medium framing per frame the broadcast pacing assumes
REPLY_EST = const(600)  # bytes of a large reply (state, info) with the medium's framing
DRAIN_MS = const(500)  # after the last block: time for it to cross the medium
FLOW = const(0)  # slot kinds; ANNOUNCE is also the session's first phase
ANNOUNCE = const(1)
SENDING = const(2)
DRAIN = const(3)
COLLECT = const(4)  # a slot kind too: reading a member's progress map before a repair round
MODES = ("auto", "multicast", "unicast")
RESULTS_PAGE = const(4)
METERS_PAGE = const(16)
BACKOFF_MS = const(1000)
FILL_MS = const(200)
RTO_MIN = const(100)  # ms: the shortest wait for a reply before sending a request again  # the next attempt is looked for at least this often (retry times, deadlines)
PROBE_MS = const(15000)

_BYTES = (bytes, bytearray, memoryview)
_BRIEF = {"brief": True}  # the meter info a poll needs (boots, trial, slots); a meter without it answers in full


def _active(info):
    for s in info.get("slots", ()):
        if s.get("active"):
            return s
    return {}


def _other(info):
    for s in info.get("slots", ()):
        if not s.get("active"):
            return s
    return {}


class Job:
    def __init__(self, d):
        self.id = d["j"]
        self.hash = bytes(d["h"])
        self.prio = d["p"]
        self.retries = d["r"]
        self.created = d["c"]
        self.deadline = d["d"]
        self.not_before = d.get("nb", 0)
        self.not_after = d.get("na", 0)
        self.targets = d.get("t")
        self.k = d.get("kp", 0)  # meters at once (0: the concentrator's `parallel`)
        self.mode = d.get("m", "")  # auto | multicast | unicast ("": the concentrator's default)
        self.mc_done = False  # its multicast session took place (since this boot)
        self.cancelled = False
        self.res = {}  # meter id -> OK | KO | UNREACHABLE
        self.att = {}  # meter id -> failed attempts so far

    def state(self, total):
        if self.cancelled:
            return "cancelled"
        if len(self.res) >= total:
            return "done"
        return "running" if self.res or self.att else "pending"


class StoreUpload(grp_image.ImageGroup):
    """The image-group upload protocol into the concentrator's image store."""

    def __init__(self, engine, disp):
        super().__init__(engine.ctx.up, disp, engine.store_session, engine.store)
        self.engine = engine

    def _target(self):
        return 0

    def _admit(self, target, hdr, req):
        if self.engine.store_in_use():
            raise GroupError(RC_STORE_BUSY, GROUP)

    def _accept(self, inf):
        pass  # the meters check signatures and versions themselves


class Slot:
    """One meter being worked on: its peer, its requests in flight (each a
    preallocated frame, resent on timeout) and its flow, a generator resumed
    with every reply, timeout or wake-up: the engine never blocks on a meter."""

    def __init__(self):
        # seq -> [frame (None: an upload chunk, rebuilt from the store to send again),
        #         deadline, give-up time, timeout, sent at, resent, rto, SMP header, chunk offset, chunk length]
        self.inflight = {}
        self.ibytes = 0  # bytes of those requests
        self.srtt = -1  # this meter's smoothed round trip (ms; -1: not measured yet)
        self.rttvar = 0
        self.seq = 0
        self.gen = None
        self.kind = FLOW
        self.job = None
        self.mid = None
        self.peer = None
        self.wake = None
        self.sent = 0  # image bytes sent to this meter by unicast in this attempt
        self.via = None


class Multicast:
    """One session: the job's image to every member at once."""

    def __init__(self, job, sid):
        self.job = job
        self.sid = sid
        self.phase = ANNOUNCE
        self.members = 0
        self.mids = []  # the members
        self.idx = {}  # member -> its bit in the missing-sets
        self.round = 0  # repair rounds sent (0: the first pass)
        self.need = None  # block -> the members missing it (a bit each), from the last COLLECT
        self.cnt = None  # block -> how many members miss it
        self.pend = None  # a repair round's blocks still to pack, most missed first
        self.todo = None  # members still to COLLECT from
        self.again = None  # members to COLLECT from next time: still missing blocks, or silent
        self.miss = {}  # member -> blocks it missed at its last COLLECT
        self.xpackets = 0  # repair packets sent
        self.xblocks = 0  # blocks members got from them (misses that went between two COLLECTs)
        self.off = 0  # next block
        self.parity = -1  # sector whose parity block goes next
        self.t0 = 0
        self.bits = 0  # sent so far, with the medium's framing: the pacing
        self.frames = 0
        self.until = 0


def _frame(op, group, cmd, body):
    out = bytearray(8)
    cbor.dumps(body, out)
    struct.pack_into(">BBHHBB", out, 0, (1 << 3) | op, 0, len(out) - 8, group, 0, cmd)
    return out


def _kv(b, i, key, v):
    # CBOR: a one-letter text key and a uint32 value
    b[i] = 0x61
    b[i + 1] = key
    b[i + 2] = 0x1A
    struct.pack_into(">I", b, i + 3, v)
    return i + 7


class Engine:
    def __init__(self, ctx, disp):
        self.ctx = ctx
        b = ctx.board
        cfg = b.config
        self.meters = []
        self.by_id = {}
        for m in cfg.get("meters", ()):
            e = {"id": m["id"], "link": m["link"], "reachable": None, "since": 0, "version": "", "hash": b"",
                 "state": "unknown"}
            self.meters.append(e)
            self.by_id[m["id"]] = e
        self.reset_s = int(cfg.get("meter_reset_s", 30))
        self.store = slots.SlotTable(b.store)
        self.store_session = upload.Session(b.meta, META_STORE_SESSION)
        self.store_session.load(self.store)
        self.log = joblog.JobLog(b.jobs)
        self.jobs = {}
        self.next_id = 1
        self.log.replay(self._apply)
        self.peers = {}
        self.next_try = {}
        self.lastfail = {}
        self.probe_at = time.ticks_ms()
        self.probe_i = 0
        # Meters worked on at once: K slots, within the heap: a busy slot holds
        # its requests in flight and what its flow allocates; what is left must
        # serve the host (a datagram of buf_size).
        gc.collect()
        fit = max(1, (gc.mem_free() - HEAP_RESERVE) // SLOT_HEAP)
        self.kmax = max(1, min(KMAX, int(cfg.get("parallel", 8)), fit))
        self.slots = [Slot() for _ in range(self.kmax)]
        self.work = {}  # meter id -> slot
        self.by_addr = {}  # UDP address -> slot
        self.inflight_bytes = 0
        # The engine's loop must cost O(1) per event, not O(meters) or O(slots):
        # the next attempt is looked for only when a slot frees, a job changes or
        # FILL_MS passed (a retry time, a deadline), and the slots' requests and
        # wake-ups are scanned only once the earliest of their deadlines is due.
        self.fill_at = time.ticks_ms()
        self.next_tk = time.ticks_ms()
        self.streams = False  # a slot's meter is on a byte stream (polled, not on the UDP socket)
        med = cfg.get("medium") or {}
        self.med_kind = med.get("kind", "")
        self.med_bps = int(med.get("bps", 0))
        self.bcast = None
        if med.get("bcast"):
            host, _, port = med["bcast"].partition(":")[2].rpartition(":")
            self.bcast = socket.getaddrinfo(host, int(port))[0][-1]
        self.mode = cfg.get("multicast", "auto")
        # One XOR parity block per sector in the pass: off, it does not pay (README, Fan-out).
        self.parity = bool(cfg.get("mc_parity", False))
        self.rounds = int(cfg.get("mc_rounds", 4))  # XOR repair rounds after the first pass, at most
        self.xpackets = 0  # repair packets broadcast, and blocks members rebuilt from them (since boot)
        self.xblocks = 0
        self.xrep = {}  # (job id, meter id) -> blocks it got from the repair rounds
        self.via = {}  # (job id, meter id) -> "multicast" | "unicast"
        self.sent_before = {}  # (job id, meter id) -> unicast image bytes of its failed attempts
        self.mc = None
        self.mcbuf = bytearray(_BLOCK_HDR + _X_HDR + CHUNK)
        self.txbuf = bytearray(_CHUNK_HDR + UCHUNK)  # every upload chunk is built here, sent, and rebuilt to resend
        self.nreq = 0  # requests to meters (slots), and how many were sent again after a timeout
        self.nretx = 0
        self.heap_peak = 0  # heap in use at most, garbage included (what a collection finds)
        self.live_peak = 0  # live heap at most, after a collection at each meter's start
        self.uploader = StoreUpload(self, disp)

    # -- the log -------------------------------------------------------------------
    def _apply(self, r):
        self.fill_at = time.ticks_ms()  # a job, a result or a cancel: look for the next attempt
        k = r.get("k")
        if k == "job":
            j = Job(r)
            self.jobs[j.id] = j
            self.next_id = max(self.next_id, j.id + 1)
        elif k == "res" and r["j"] in self.jobs:
            self.jobs[r["j"]].res[r["m"]] = r["s"]
        elif k == "att" and r["j"] in self.jobs:
            self.jobs[r["j"]].att[r["m"]] = r["a"]
        elif k == "can" and r["j"] in self.jobs:
            self.jobs[r["j"]].cancelled = True

    def _write(self, r):
        self.log.append(r)
        self._apply(r)

    # -- helpers ------------------------------------------------------------------
    def targets(self, job):
        return job.targets if job.targets is not None else [m["id"] for m in self.meters]

    def active_jobs(self):
        out = [j for j in self.jobs.values() if not j.cancelled and len(j.res) < len(self.targets(j))]
        out.sort(key=lambda j: (-j.prio, j.id))
        return out

    def store_in_use(self):
        return bool(self.active_jobs())

    def stored(self):
        s = self.store_session
        inf = self.store.info(0)
        if inf is None or s.state != upload.DONE:
            return None
        return inf

    def peer(self, mid):
        # The idle probe's peer (blocking requests): one at a time.
        p = self.peers.get(mid)
        if p is None:
            for old in self.peers.values():
                old.close()
            p = smpc.open_peer(self.by_id[mid]["link"], self.ctx.pump, self.ctx.buf_size, self.ctx.board)
            self.peers = {mid: p}
        return p

    def _mark(self, mid, info):
        m = self.by_id[mid]
        now = int(time.time())
        up = info is not None
        if m["reachable"] != up:
            m["since"] = now
        m["reachable"] = up
        if up:
            a = _active(info)
            m["version"] = a.get("version", "")
            m["hash"] = bytes(a.get("hash", b""))
            m["state"] = "trial" if info.get("trial") else ("confirmed" if a else "no image")
        else:
            m["state"] = "silent"

    def _multicast(self, j):
        """Whether the job's image goes to its meters in one multicast session."""
        if self.bcast is None or j.mc_done:
            return False
        mode = j.mode or self.mode
        if mode == "multicast":
            return True
        if mode != "auto" or self.med_kind != "shared":
            return False
        return sum(1 for mid in self.targets(j) if mid not in j.res) >= 2

    # -- the engine (called from the serve loop) -------------------------------
    def _due(self):
        """(job, meter) for the next attempt, (job, None) for a job past its
        deadline or window, or None when nothing is due. A job being worked on
        holds lower-priority jobs back."""
        now = time.time()
        tk = time.ticks_ms()
        for j in self.active_jobs():
            if now < j.not_before:
                continue
            late = now > j.deadline or (j.not_after and now > j.not_after)
            mc = self.mc is not None and self.mc.job is j
            busy = False
            for mid in self.targets(j):
                if mid in j.res:
                    continue
                if mid in self.work:
                    busy = True
                    continue
                if late:
                    return j, None
                if mc and self.via.get((j.id, mid)) == "multicast":
                    busy = True  # waits for the session to end, then its repair
                    continue
                if time.ticks_diff(tk, self.next_try.get((j.id, mid), tk)) >= 0:
                    return j, mid
            if busy:
                return None
        return None

    def has_work(self):
        return bool(self.work) or self.mc is not None or self._due() is not None

    def poll(self):
        try:
            self._fill()
            if self.mc is not None:
                self._mc_step()
            if self.work or self.mc is not None:
                self._io()
            else:
                self._probe()
        except MemoryError:
            gc.collect()
        a = gc.mem_alloc()
        if a > self.heap_peak:
            self.heap_peak = a

    def _probe(self):
        tk = time.ticks_ms()
        if self.meters and time.ticks_diff(tk, self.probe_at) >= 0:
            self.probe_at = time.ticks_add(tk, PROBE_MS // max(1, len(self.meters)))
            m = self.meters[self.probe_i % len(self.meters)]
            self.probe_i += 1
            try:
                self._mark(m["id"], self.peer(m["id"]).request(OP_READ, 64, 0, {}, 500, 0))
            except (PeerTimeout, PeerError, ValueError):
                self._mark(m["id"], None)

    def _fill(self):
        if time.ticks_diff(time.ticks_ms(), self.fill_at) < 0:
            return
        while True:
            due = self._due()
            if due is None:
                break
            j, mid = due
            if mid is None:
                self._expire(j)
                continue
            if len(self.work) >= min(self.kmax, j.k or self.kmax):
                break
            self._start(j, mid)
        self.fill_at = time.ticks_add(time.ticks_ms(), FILL_MS)

    def _wake(self, tk):
        # An earlier deadline than the engine knows of: scan the slots by then.
        if time.ticks_diff(tk, self.next_tk) < 0:
            self.next_tk = tk

    def _start(self, j, mid, kind=None):
        s = None
        for x in self.slots:
            if x.gen is None:
                s = x
                break
        if not self.work:
            self.next_tk = time.ticks_ms()  # idle since: forget a deadline of long ago (ticks wrap)
        gc.collect()  # an attempt allocates; start each from a clean heap
        a = gc.mem_alloc()
        if a > self.live_peak:
            self.live_peak = a
        try:
            s.peer = smpc.open_peer(self.by_id[mid]["link"], self.ctx.pump, self.ctx.buf_size, self.ctx.board)
        except ValueError as e:
            self._attempt_done(j, mid, ("KO", "bad link: %s" % e, None, None), None, 0)
            return
        s.job = j
        s.mid = mid
        s.sent = 0
        s.wake = None
        s.inflight = {}
        s.ibytes = 0
        s.srtt = -1
        s.rttvar = 0
        s.via = self.via.get((j.id, mid))
        if kind is not None:
            s.kind = kind
        elif s.via is None and self._multicast(j):
            if self.mc is None:
                self.mc = Multicast(j, (time.ticks_ms() ^ (j.id << 20)) & 0x3FFFFFFF)
            mc = self.mc
            if mc.job is j and (mc.phase == ANNOUNCE or (mc.phase == SENDING and mc.round == 0)):
                s.kind = ANNOUNCE  # during the pass too: a late joiner takes the rest, the rounds what it missed
            else:
                s.kind = FLOW
        else:
            s.kind = FLOW
        if s.kind == ANNOUNCE:
            s.gen = self._announce(s, j, mid)
        elif s.kind == COLLECT:
            s.gen = self._collect(s, mid)
        else:
            s.gen = self._flow(s, j, mid)
        self.work[mid] = s
        self.streams = self.streams or s.peer.stream_like
        addr = getattr(s.peer, "addr", None)
        if addr is not None:
            self.by_addr[bytes(addr)] = s
        self._resume(s, None)

    def _resume(self, s, ev):
        try:
            s.gen.send(ev)
            return
        except StopIteration as e:
            res = e.args[0] if e.args else None
        except MemoryError:
            gc.collect()
            res = ("KO", "concentrator out of memory", None, None)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            res = ("KO", "meter reply not understood: %r" % e, None, None)
        self._end(s, res)

    def _end(self, s, res):
        for e in s.inflight.values():
            self.inflight_bytes -= e[9]
        s.inflight = {}
        s.ibytes = 0
        j, mid, kind, via, sent = s.job, s.mid, s.kind, s.via, s.sent
        self.work.pop(mid, None)
        self.fill_at = time.ticks_ms()  # a slot is free
        self.streams = any(x.peer.stream_like for x in self.work.values() if x.peer is not None and x is not s)
        addr = getattr(s.peer, "addr", None)
        if addr is not None and self.by_addr.get(bytes(addr)) is s:
            del self.by_addr[bytes(addr)]
        s.peer.close()
        s.gen = s.job = s.peer = None
        if kind == ANNOUNCE:
            self._announced(j, mid, res)
        elif kind == COLLECT:
            pass  # what it said is in the session's counts
        else:
            self._attempt_done(j, mid, res, via, sent)

    # -- requests in flight ----------------------------------------------------------
    def _queue(self, s, n):
        # On a medium of known rate, a reply also waits for what is queued before
        # it: on a shared medium, our requests in flight to every meter and a reply
        # (up to REPLY_EST) per meter worked on; on a star, this meter's link only.
        if not self.med_bps:
            return 0
        if self.med_kind == "shared":
            return (self.inflight_bytes + n + len(self.work) * REPLY_EST) * 16000 // self.med_bps
        return (s.ibytes + n + REPLY_EST) * 16000 // self.med_bps

    def _rto(self, s, tmo):
        # The first wait for a reply: the meter's round trip as measured on this
        # link (RFC 6298: srtt + 4 rttvar, at least RTO_MIN), never more than the
        # request's own timeout; that timeout until there is a measurement.
        if s.srtt < 0:
            return tmo
        return min(tmo, max(RTO_MIN, s.srtt + 4 * s.rttvar))

    def _rtt(self, s, e):
        # Karn: a request sent more than once says nothing of the round trip.
        if e[5]:
            return
        r = time.ticks_diff(time.ticks_ms(), e[4])
        if s.srtt < 0:
            s.srtt = r
            s.rttvar = r // 2
        else:
            s.rttvar = (3 * s.rttvar + abs(s.srtt - r)) // 4
            s.srtt = (7 * s.srtt + r) // 8

    def _send(self, s, frame, tmo, retries, chunk=0):
        # A request is given up after its whole patience, tmo x (retries + 1) (plus
        # the queue before it), as before; within it, it is sent again after
        # each RTO, doubling, so a lost frame costs a round trip, not a timeout.
        seq = s.seq
        while seq in s.inflight:
            seq = (seq + 1) & 0xFF
        s.seq = (seq + 1) & 0xFF
        frame[6] = seq
        self.nreq += 1
        n = len(frame)
        now = time.ticks_ms()
        q = self._queue(s, n)
        rto = self._rto(s, tmo) if retries else tmo
        end = time.ticks_add(now, tmo * (retries + 1) + q)
        d = time.ticks_add(now, rto + q)
        # [frame, next deadline, give-up time, timeout, sent at, times resent, rto]
        s.inflight[seq] = [None if chunk else frame, d, end, tmo, now, 0, rto, bytes(frame[:8]), chunk, n]
        self._wake(d)
        self.inflight_bytes += n
        s.ibytes += n
        s.peer._send(frame)
        return seq

    def _cancel(self, s, seq):
        e = s.inflight.pop(seq, None)
        if e is not None:
            self.inflight_bytes -= e[9]
            s.ibytes -= e[9]

    def _io(self):
        tk = time.ticks_ms()
        wait = min(50, time.ticks_diff(self.next_tk, tk), time.ticks_diff(self.fill_at, tk))
        mc = self.mc
        if mc is not None and mc.phase == SENDING:
            wait = min(wait, time.ticks_diff(self._mc_due(mc), tk))
        if self.streams:
            wait = min(wait, 10)
        if wait > 0:
            self.ctx.pump(wait, smpc.udp_socket())
        self._rx()
        self._timeouts()

    def _rx(self):
        sock = smpc.udp_socket()
        n = self.ctx.buf_size + 8
        # Bounded: replies can come in as fast as they are handled (each sends
        # the next request), and the host must be served in between.
        for _ in range(2 * len(self.work) + 2):
            try:
                data, src = sock.recvfrom(n)
            except OSError:
                break
            s = self.by_addr.get(bytes(src))
            if s is not None:
                self._reply(s, data)
        for s in list(self.work.values()) if self.streams else ():
            if s.peer is not None and s.peer.stream_like:
                f = s.peer.take()
                while f is not None and s.peer is not None:
                    self._reply(s, f)
                    f = s.peer.take() if s.peer is not None else None

    def _reply(self, s, frame):
        if len(frame) < 8:
            return
        b0, _f, ln, g, sq, c = struct.unpack_from(">BBHHBB", frame)
        e = s.inflight.get(sq)
        if e is None:
            return  # a late reply to a try given up, or not ours
        f = e[7]
        if ln != len(frame) - 8 or (b0 & 7) != (f[0] & 7) + 1 or g != ((f[4] << 8) | f[5]) or c != f[7]:
            return
        self._rtt(s, e)
        self._cancel(s, sq)
        try:
            r = cbor.loads(memoryview(frame)[8:]) if ln else {}
        except ValueError:
            r = None
        if not isinstance(r, dict):
            r = PeerError(-1, 3)
        else:
            err = r.get("err")
            if isinstance(err, dict) and err.get("rc"):
                r = PeerError(err.get("group", g), err["rc"])
            elif r.get("rc"):
                r = PeerError(-1, r["rc"])
        self._resume(s, (sq, r))

    def _timeouts(self):
        now = time.ticks_ms()
        if time.ticks_diff(now, self.next_tk) < 0:
            return
        self.next_tk = time.ticks_add(now, 1000)
        for s in list(self.work.values()):
            for sq in list(s.inflight):
                e = s.inflight.get(sq)
                if e is None or s.gen is None or time.ticks_diff(now, e[1]) < 0:
                    continue
                if time.ticks_diff(e[2], now) > 0:
                    e[5] += 1
                    e[6] = min(e[6] * 2, e[3])
                    e[1] = time.ticks_add(now, min(e[6] + self._queue(s, e[9]), time.ticks_diff(e[2], now)))
                    self._wake(e[1])
                    f = e[0]
                    if f is None:
                        f = self._chunk(self.txbuf, e[8], e[9] - _CHUNK_HDR)
                        f[6] = sq
                    s.peer._send(f)
                    self.nretx += 1
                else:
                    self._cancel(s, sq)
                    self._resume(s, (sq, PeerTimeout()))
            if s.gen is not None and s.wake is not None and time.ticks_diff(now, s.wake) >= 0:
                s.wake = None
                self._resume(s, (None, None))
        # What is still pending after the scan (resumed flows set theirs through _wake).
        for s in self.work.values():
            for e in s.inflight.values():
                self._wake(e[1])
            if s.wake is not None:
                self._wake(s.wake)

    # -- what a flow waits on (generators: `yield from`) -----------------------------
    def _req(self, s, op, group, cmd, body, tmo=2000, retries=2):
        seq = self._send(s, _frame(op, group, cmd, body), tmo, retries)
        while True:
            ev = yield
            if ev[0] == seq:
                break
        r = ev[1]
        if isinstance(r, Exception):
            raise r
        return r

    def _sleep(self, s, ms):
        s.wake = time.ticks_add(time.ticks_ms(), ms)
        self._wake(s.wake)
        while True:
            ev = yield
            if ev[0] is None:
                return

    # -- results ------------------------------------------------------------------------
    def _expire(self, j):
        for mid in self.targets(j):
            if mid not in j.res and mid not in self.work:
                kind, why = self.lastfail.get((j.id, mid), ("SILENT", "not reached before the deadline"))
                self._result(j, mid, "UNREACHABLE" if kind == "SILENT" else "KO", why, None, None)

    def _result(self, j, mid, res, why, rec, mac, via=None, sent=0):
        r = {"k": "res", "j": j.id, "m": mid, "s": res, "rs": why[:64], "a": j.att.get(mid, 0) + (res == "OK"),
             "t": int(time.time())}
        if via is not None:
            r["v"] = via
            r["u"] = sent
            x = self.xrep.get((j.id, mid), 0)
            if x:
                r["x"] = x
        if rec is not None:
            r["rec"] = rec
            r["mac"] = mac
        self._write(r)

    def _attempt_done(self, j, mid, result, via, sent):
        key = (j.id, mid)
        sent += self.sent_before.pop(key, 0)
        if mid in j.res:
            return  # the job ended (deadline) while this attempt ran
        res, why, rec, mac = result
        if via is None:
            via = "none" if why == "already running this image" and not sent else "unicast"
        if res == "OK":
            self._result(j, mid, "OK", why, rec, mac, via, sent)
            return
        self._failed(j, mid, res, why, rec, mac, via, sent)

    def _failed(self, j, mid, res, why, rec, mac, via=None, sent=0):
        print("concentrator: %s attempt %d failed: %s %s" % (mid, j.att.get(mid, 0) + 1, res, why))
        n = j.att.get(mid, 0) + 1
        self._write({"k": "att", "j": j.id, "m": mid, "a": n})
        self.lastfail[(j.id, mid)] = (res, why)
        if n > j.retries:
            self._result(j, mid, "UNREACHABLE" if res == "SILENT" else "KO", why, rec, mac, via, sent)
        else:
            self.sent_before[(j.id, mid)] = sent  # unicast bytes so far: the result counts every attempt
            self.next_try[(j.id, mid)] = time.ticks_add(time.ticks_ms(), min(60000, BACKOFF_MS << (n - 1)))

    def _hello(self, s, mid, brief=False):
        """Read a meter's info: (info, None), or (None, a failed attempt's tuple).
        Brief: only boots, trial, self_confirm and the slots."""
        try:
            info = yield from self._req(s, OP_READ, 64, 0, _BRIEF if brief else {}, 1500, 1)
        except PeerTimeout:
            self._mark(mid, None)
            return None, ("SILENT", "no answer", None, None)
        except PeerError as e:
            return None, ("KO", "not a meterota meter (rc %d)" % e.rc, None, None)
        self._mark(mid, info)
        return info, None

    # -- the multicast session ------------------------------------------------------------
    def _announce(self, s, j, mid):
        """Announce the session to one meter; "MEMBER", None (unicast for it)
        or a failed attempt's (SILENT | KO, reason, None, None)."""
        info, fail = yield from self._hello(s, mid, True)
        if fail:
            return fail
        other = _other(info)
        if _active(info).get("hash") == j.hash or info.get("trial") or other.get("pending") or \
                other.get("hash") == j.hash:
            return None  # nothing to send, or a slot to clear first: the unicast flow decides
        sess = self.store_session
        hdr = memoryview(self.txbuf)[:32]
        self.store[0].readinto(0, hdr)
        try:
            r = yield from self._req(s, OP_WRITE, 64, 4, {"sid": self.mc.sid, "len": sess.length, "sha": sess.sha,
                                                         "hdr": hdr, "bs": CHUNK}, 3000, 2)
        except PeerTimeout:
            self._mark(mid, None)
            return "SILENT", "no answer to the multicast announce", None, None
        except PeerError:
            return None  # no multicast receiver (ENOTSUP), or it refused: unicast
        if r.get("off", 0) >= sess.length:
            return None
        return "MEMBER"

    def _announced(self, j, mid, res):
        if res == "MEMBER":
            self.via[(j.id, mid)] = "multicast"
            if self.mc is not None and self.mc.job is j:
                self.mc.members += 1
                self.mc.idx[mid] = len(self.mc.mids)
                self.mc.mids.append(mid)
            return
        if res is not None:
            # Not announced (silent, or not a meterota meter): its next attempt
            # announces it again while the pass is on, else goes by unicast.
            self._failed(j, mid, res[0], res[1], None, None, "unicast", 0)
            return
        self.via[(j.id, mid)] = "unicast"

    def _mc_due(self, mc):
        return time.ticks_add(mc.t0, mc.bits // max(1, self.med_bps // 1000))

    def _mc_step(self):
        mc = self.mc
        now = time.ticks_ms()
        if mc.job.cancelled:
            self._mc_end()  # the meters in flight finish; nothing more goes out for it
            return
        if mc.phase == ANNOUNCE:
            for s in self.work.values():
                if s.kind == ANNOUNCE:
                    return
            j = mc.job
            tk = now
            for mid in self.targets(j):
                if (mid not in j.res and mid not in self.work and (j.id, mid) not in self.via
                        and (time.ticks_diff(tk, self.next_try.get((j.id, mid), tk)) >= 0 or j.att.get(mid) == 1)):
                    # Still to be announced (the next _fill starts it); one whose first
                    # announce failed gets its retry (a second of backoff) before the pass:
                    # left out, it would take the whole image by unicast.
                    return
            if mc.members == 0:
                self._mc_end()
                return
            mc.phase = SENDING
            mc.t0 = now
        elif mc.phase == SENDING:
            n = 0
            while n < 8 and time.ticks_diff(now, self._mc_due(mc)) >= 0:
                n += 1
                if self._mc_send(mc):
                    mc.phase = DRAIN
                    mc.until = time.ticks_add(now, DRAIN_MS)
                    break
        elif mc.phase == DRAIN:
            if time.ticks_diff(now, mc.until) < 0:
                return
            todo = list(mc.mids) if mc.round == 0 else mc.again
            if self.rounds > 0 and todo:
                # Each member's progress map: who misses what, for a repair round
                # (or, after the last one, what the rounds repaired).
                mc.phase = COLLECT
                mc.need = {}
                mc.cnt = {}
                mc.todo = todo
                mc.again = []
            else:
                self._mc_end()
        elif mc.phase == COLLECT:
            k = min(self.kmax, mc.job.k or self.kmax)
            while mc.todo and len(self.work) < k:
                mid = mc.todo.pop()
                if mid not in self.work and mid not in mc.job.res:
                    self._start(mc.job, mid, COLLECT)
            if mc.todo:
                return
            for s in self.work.values():
                if s.kind == COLLECT:
                    return
            mc.todo = None
            if not mc.need or mc.round >= self.rounds:
                self._mc_end()  # nothing missing, or the last round: the unicast repair does the rest
                return
            # Most-missed blocks first: they fill a packet's members soonest.
            cnt = mc.cnt
            mc.pend = sorted(mc.need, key=lambda i: (-cnt[i], i))
            mc.cnt = None
            mc.round += 1
            mc.phase = SENDING
            mc.t0 = now
            mc.bits = 0

    def _collect(self, s, mid):
        """Read a member's progress map into the session's missing-sets."""
        mc = self.mc
        try:
            r = yield from self._req(s, OP_READ, 64, 4, {}, 1500, 1)
        except PeerTimeout:
            if mc is not None and mc is self.mc:
                mc.again.append(mid)  # once more next time; its repair will tell
            return None
        except PeerError:
            return None
        m = r.get("map")
        if mc is None or mc is not self.mc or r.get("sid") != mc.sid or not isinstance(m, _BYTES):
            return None  # out of the session (rebooted, or a unicast upload took over): its repair
        need = mc.need
        cnt = mc.cnt
        bit = 1 << mc.idx[mid]
        nblk = (self.store_session.length + CHUNK - 1) // CHUNK
        n = 0
        for k in range(len(m)):
            b = m[k]
            if b:
                for x in range(4):
                    if (b >> x) & 1 and k * 4 + x < nblk:
                        n += 1
        if n > nblk // 4 and mc.round == 0:
            # A late joiner, or a loss burst: a round needs a packet per block
            # its worst member misses; this one's are cheaper by unicast.
            mc.miss.pop(mid, None)
            return None
        for k in range(len(m)):
            b = m[k]
            if b:
                for x in range(4):
                    i = k * 4 + x
                    if (b >> x) & 1 and i < nblk:
                        need[i] = need.get(i, 0) | bit
                        cnt[i] = cnt.get(i, 0) + 1
        was = mc.miss.get(mid)
        if was is not None and was > n:
            key = (mc.job.id, mid)
            self.xrep[key] = self.xrep.get(key, 0) + was - n
            mc.xblocks += was - n
            self.xblocks += was - n
        mc.miss[mid] = n
        if n:
            mc.again.append(mid)
        return None

    def _mc_end(self):
        self.mc.job.mc_done = True
        self.mc = None
        self.fill_at = time.ticks_ms()  # the session's members are due for their repair

    def _mc_send(self, mc):
        """Broadcast the next block (or parity block, or repair packet); True after the last."""
        total = self.store_session.length
        b = self.mcbuf
        mv = memoryview(b)
        if mc.round > 0:
            return self._mc_repair(mc, total, b, mv)
        par = mc.parity >= 0
        b[8] = 0xA4 if par else 0xA3
        i = _kv(b, 9, 0x73, mc.sid)  # "s"
        if par:
            sector = mc.parity
            mc.parity = -1
            i = _kv(b, i, 0x6F, sector * upload.SECTOR)  # "o"
            b[i] = 0x61
            b[i + 1] = 0x70  # "p": 1
            b[i + 2] = 0x01
            i += 3
            k = CHUNK
            x = 0
            end = min(total, (sector + 1) * upload.SECTOR)
            for o in range(sector * upload.SECTOR, end, CHUNK):
                n = min(CHUNK, end - o)
                blk = mv[i + 5:i + 5 + CHUNK]
                self.store[0].readinto(o, blk[:n])
                for z in range(n, CHUNK):
                    blk[z] = 0
                x ^= int.from_bytes(blk, "big")
            mv[i + 5:i + 5 + CHUNK] = x.to_bytes(CHUNK, "big")
        else:
            off = mc.off
            k = min(CHUNK, total - off)
            i = _kv(b, i, 0x6F, off)
            self.store[0].readinto(off, mv[i + 5:i + 5 + k])
            mc.off = off + k
            if self.parity and (mc.off % upload.SECTOR == 0 or mc.off == total):
                mc.parity = off // upload.SECTOR
        self._mc_out(mc, b, mv, i, k)
        return mc.off >= total and mc.parity < 0

    def _mc_out(self, mc, b, mv, i, k):
        # "d": k bytes already at i + 5; then the SMP header, and onto the medium.
        b[i] = 0x61
        b[i + 1] = 0x64  # "d"
        b[i + 2] = 0x59
        struct.pack_into(">H", b, i + 3, k)
        n = i + 5 + k
        struct.pack_into(">BBHHBB", b, 0, (1 << 3) | OP_WRITE, 0, n - 8, 64, mc.frames & 0xFF, 5)
        try:
            smpc.udp_socket().sendto(mv[:n], self.bcast)
        except OSError:
            pass  # like a frame lost on the medium; the next round or the repair sends it
        mc.frames += 1
        mc.bits += (n + MC_OVERHEAD) * 8

    def _mc_repair(self, mc, total, b, mv):
        """One packet of a repair round: the XOR of a set S of blocks no member
        misses two of (greedy, most-missed first, at most XMAX), so each member
        missing one of them rebuilds it; a lone block goes as a plain block.
        True when the round has nothing left."""
        need = mc.need
        pend = mc.pend
        if not pend:
            return True
        S = []
        cov = 0
        rest = []
        for blk in pend:
            m = need[blk]
            if len(S) < XMAX and not (m & cov):
                S.append(blk)
                cov |= m
            else:
                rest.append(blk)
        mc.pend = rest
        S.sort()
        i = _kv(b, 9, 0x73, mc.sid)  # "s"
        if len(S) == 1:
            b[8] = 0xA3
            off = S[0] * CHUNK
            k = min(CHUNK, total - off)
            i = _kv(b, i, 0x6F, off)  # "o"
            self.store[0].readinto(off, mv[i + 5:i + 5 + k])
        else:
            b[8] = 0xA4
            b[i:i + 3] = b"\x61\x6f\x20"  # "o": -1, out of range for a receiver without repair packets
            b[i + 3] = 0x61
            b[i + 4] = 0x78  # "x"
            i += 5
            if len(S) < 24:
                b[i] = 0x80 + len(S)
                i += 1
            else:
                b[i] = 0x98
                b[i + 1] = len(S)
                i += 2
            for blk in S:
                if blk < 24:
                    b[i] = blk
                    i += 1
                elif blk < 256:
                    b[i] = 0x18
                    b[i + 1] = blk
                    i += 2
                elif blk < 65536:
                    b[i] = 0x19
                    struct.pack_into(">H", b, i + 1, blk)
                    i += 3
                else:
                    b[i] = 0x1A
                    struct.pack_into(">I", b, i + 1, blk)
                    i += 5
            k = CHUNK
            d = mv[i + 5:i + 5 + CHUNK]
            x = 0
            for blk in S:
                n = min(CHUNK, total - blk * CHUNK)
                self.store[0].readinto(blk * CHUNK, d[:n])
                for z in range(n, CHUNK):
                    d[z] = 0
                x ^= int.from_bytes(d, "big")
            d[:] = x.to_bytes(CHUNK, "big")
        self._mc_out(mc, b, mv, i, k)
        mc.xpackets += 1
        self.xpackets += 1
        return False  # the next call finds whether any is left

    # -- one meter ----------------------------------------------------------------
    def _flow(self, s, j, mid):
        """Upgrade one meter; returns (OK | KO | SILENT, reason, rec, mac)."""
        info, fail = yield from self._hello(s, mid)
        if fail:
            return fail
        try:
            act = _active(info)
            if act.get("hash") == j.hash and not info.get("trial"):
                rec, mac = yield from self._record(s)
                return "OK", "already running this image", rec, mac
            before = yield from self._seq(s)
            if not (info.get("trial") and act.get("hash") == j.hash):
                if info.get("trial"):
                    return "KO", "meter is testing another image", None, None
                other = _other(info)
                if other.get("hash") != j.hash:
                    if other.get("pending"):
                        yield from self._req(s, OP_WRITE, 1, 5, {"slot": 1})
                    yield from self._push(s, info)
                yield from self._req(s, OP_WRITE, 1, 0, {"hash": j.hash, "confirm": False})
                boots = (yield from self._req(s, OP_READ, 64, 0, _BRIEF))["boots"]
                yield from self._reset(s)
                info = yield from self._wait_back(s, boots)
                if info is None:
                    self._mark(mid, None)
                    return "SILENT", "no answer after reset into the test image", None, None
                self._mark(mid, info)
                act = _active(info)
            if act.get("hash") != j.hash:
                rec, mac = yield from self._record(s)
                why = "reverted"
                if rec is not None:
                    why = str(cbor.loads(rec).get("rsn", why))
                return "KO", why, rec, mac
            if info.get("trial"):
                if info.get("self_confirm"):
                    yield from self._wait_confirmed(s)
                else:
                    yield from self._req(s, OP_WRITE, 1, 0, {"confirm": True})
            rec, mac = yield from self._record(s)
            if rec is None:
                return "KO", "no confirmation record", None, None
            d = cbor.loads(rec)
            if d.get("seq", 0) <= before or bytes(d.get("hash", b"")) != j.hash:
                return "KO", "confirmation record is not about this upgrade", rec, mac
            m = self.by_id[mid]  # what the record says: no other read on a slow medium
            if d.get("res") == "OK":
                m["hash"] = j.hash
                m["version"] = str(d.get("ver", m["version"]))
                m["state"] = "confirmed"
            return ("OK" if d.get("res") == "OK" else "KO"), str(d.get("rsn", "")), rec, mac
        except PeerTimeout:
            self._mark(mid, None)
            return "SILENT", "meter stopped answering", None, None
        except PeerError as e:
            return "KO", "meter refused: group %d rc %d" % (e.group, e.rc), None, None

    def _record(self, s):
        try:
            r = yield from self._req(s, OP_READ, 64, 1, {})
        except PeerError:
            return None, None
        return bytes(r["rec"]), bytes(r["mac"])

    def _seq(self, s):
        rec, _ = yield from self._record(s)
        return cbor.loads(rec).get("seq", 0) if rec is not None else 0

    def _wait_back(self, s, boots):
        deadline = time.ticks_add(time.ticks_ms(), self.reset_s * 1000)
        while time.ticks_diff(deadline, time.ticks_ms()) > 0:
            try:
                info = yield from self._req(s, OP_READ, 64, 0, _BRIEF, 500, 0)
            except PeerTimeout:
                continue
            except PeerError:
                yield from self._sleep(s, 200)
                continue
            if info.get("boots", 0) > boots:
                return info
            # Still on the boot before: the reset request was lost (a reset it
            # performed would have come before this reply, on the same link).
            # Send it again, rather than poll a meter that will not reset.
            yield from self._reset(s)
        return None

    def _reset(self, s):
        try:
            yield from self._req(s, OP_WRITE, 0, 5, {}, 1000, 0)
        except PeerTimeout:
            pass  # the reply may be lost; the boot counter tells

    def _wait_confirmed(self, s):
        deadline = time.ticks_add(time.ticks_ms(), self.reset_s * 1000)
        while time.ticks_diff(deadline, time.ticks_ms()) > 0:
            if not (yield from self._req(s, OP_READ, 64, 0, _BRIEF)).get("trial"):
                return
            yield from self._sleep(s, 100)
        raise PeerTimeout()

    def _chunk(self, buf, off, k):
        # {"off": off, "data": <k bytes of the stored image>}, encoded in place
        b = buf
        struct.pack_into(">BBHHBB", b, 0, (1 << 3) | OP_WRITE, 0, 18 + k, 1, 0, 1)
        b[8] = 0xA2
        b[9] = 0x63
        b[10:13] = b"off"
        b[13] = 0x1A
        struct.pack_into(">I", b, 14, off)
        b[18] = 0x64
        b[19:23] = b"data"
        b[23] = 0x59
        struct.pack_into(">H", b, 24, k)
        mv = memoryview(b)
        self.store[0].readinto(off, mv[_CHUNK_HDR:_CHUNK_HDR + k])
        return mv[:_CHUNK_HDR + k]

    def _open(self, s, first):
        # The upload's first request (off 0, len, sha, the image's first bytes):
        # starts the meter's session, or resumes the same image's (its off).
        sess = self.store_session
        mv = memoryview(self.txbuf)[_CHUNK_HDR:_CHUNK_HDR + first]
        self.store[0].readinto(0, mv)
        r = yield from self._req(s, OP_WRITE, 1, 1, {"off": 0, "len": sess.length, "sha": sess.sha, "data": mv,
                                                    "image": 1, "upgrade": False}, 5000)
        s.sent += first
        return r

    def _push(self, s, info):
        """Upload the stored image to a meter, resuming where it says, with up
        to its buf_count requests in flight; the meter's `off` drives (a gap, or
        data a multicast already put there, moves it)."""
        sess = self.store_session
        total = sess.length
        # As much per request as the meter takes; a meter that heard a multicast
        # session gets 1 KiB blocks on block boundaries (where its map counts).
        n = min(UCHUNK, int(info.get("buf_size", 512)) - 96)
        if s.via == "multicast":
            n = min(n, CHUNK)
        window = max(1, min(WMAX, int(info.get("buf_count", 1))))
        # A meter that heard a multicast session has most of the image: the
        # first request then carries just the header (enough to resume or start).
        first = 32 if s.via == "multicast" else n
        r = yield from self._open(s, first)
        acked = pos = r["off"]
        again = True  # one more open when the meter says off 0: its end reply may have been lost
        pend = {}  # seq -> (end offset, start offset)
        while acked < total:
            while len(pend) < window and pos < total:
                if pos == 0:
                    raise PeerError(1, 0)  # the meter lost the session; the retry starts over
                k = min(n, total - pos)
                if n <= CHUNK and pos % CHUNK:
                    k = min(k, CHUNK - pos % CHUNK)  # back on block boundaries, where a multicast's blocks start
                seq = self._send(s, self._chunk(self.txbuf, pos, k), 3000, 2, pos)
                pend[seq] = (pos + k, pos)
                s.sent += k
                pos += k
            ev = yield
            p = pend.pop(ev[0], None)
            if p is None:
                continue
            r = ev[1]
            if isinstance(r, Exception):
                raise r
            off = r["off"]
            if r.get("match") is False:
                raise PeerError(1, 24)
            if off == p[0]:
                acked = max(acked, off)
                continue
            if off == 0:
                # No session on the meter: it lost it (a reset), or it finished
                # and the reply of the last chunk was lost. The open says which.
                if not again:
                    raise PeerError(1, 0)
                again = False
                for sq in pend:
                    self._cancel(s, sq)
                pend = {}
                r = yield from self._open(s, 32)
                acked = pos = r["off"]
                continue
            # A gap (a lost request: go back to it) or a jump over data the
            # meter has (what is in flight from there on still counts).
            keep = off > p[0] and any(q[1] == off for q in pend.values())
            for sq in list(pend):
                if not keep or pend[sq][1] < off:
                    self._cancel(s, sq)
                    del pend[sq]
            acked = off
            if not keep:
                pos = off
        for sq in pend:
            self._cancel(s, sq)
        if r.get("match") is False:
            raise PeerError(1, 24)

    # -- group 65 handlers ---------------------------------------------------------
    def h_meters(self, req):
        # Paged like the results: a fleet's whole list in one reply would need
        # a heap the size of the fleet.
        start = arg(req, "start", int, 0)
        out = []
        for m in self.meters[start:start + METERS_PAGE]:
            e = {"id": m["id"], "link": m["link"], "reachable": bool(m["reachable"]), "since": m["since"],
                 "version": m["version"], "state": m["state"]}
            if m["hash"]:
                e["hash"] = m["hash"]
            out.append(e)
        resp = {"meters": out}
        if start + len(out) < len(self.meters):
            resp["next"] = start + len(out)
        return resp

    def h_store(self, req):
        try:
            return self.uploader.upload(req)
        except GroupError as e:
            if e.group is None:
                e.group = grp_image.GROUP  # the upload's codes are the image group's
            raise

    def h_store_info(self, req):
        inf = self.stored()
        if inf is None:
            raise GroupError(RC_NO_IMAGE)
        import image

        return {"hash": inf.hash, "version": image.version_full(inf.version), "len": self.store_session.length,
                "sha": self.store_session.sha}

    def h_job_create(self, req):
        h = arg(req, "hash", _BYTES)
        inf = self.stored()
        if h is None or inf is None or bytes(h) != inf.hash:
            raise GroupError(RC_NO_IMAGE)
        targets = arg(req, "targets", list)
        if targets is not None:
            for t in targets:
                if t not in self.by_id:
                    raise GroupError(RC_BAD_TARGET)
        prio = arg(req, "priority", int, 0)
        retries = arg(req, "retries", int, 2)
        duration = arg(req, "duration", int, 3600)
        window = arg(req, "window", list)
        par = arg(req, "parallel", int, 0)
        mode = arg(req, "mode", str, "")
        if not (0 <= prio <= 255 and 0 <= retries <= 20 and duration > 0 and 0 <= par <= KMAX):
            raise MgmtError(smp.EINVAL)
        if mode and mode not in MODES:
            raise MgmtError(smp.EINVAL)
        now = int(time.time())
        r = {"k": "job", "j": self.next_id, "h": inf.hash, "p": prio, "r": retries, "c": now, "d": now + duration}
        if targets is not None:
            r["t"] = [str(t) for t in targets]
        if par:
            r["kp"] = par
        if mode:
            r["m"] = mode
        if window is not None:
            if len(window) != 2 or not all(isinstance(x, int) for x in window):
                raise MgmtError(smp.EINVAL)
            r["nb"], r["na"] = window
        self._write(r)
        return {"job": r["j"]}

    def _job(self, req):
        jid = arg(req, "job", int)
        j = self.jobs.get(jid)
        if j is None:
            raise GroupError(RC_NO_JOB)
        return j

    def _status(self, j):
        t = self.targets(j)
        c = {"OK": 0, "KO": 0, "UNREACHABLE": 0}
        for v in j.res.values():
            c[v] = c.get(v, 0) + 1
        st = j.state(len(t))
        if st == "cancelled" and any(x.job is j for x in self.work.values()):
            st = "cancelling"  # the meter in flight finishes first; its result is the job's
        out = {"job": j.id, "hash": j.hash, "state": st, "priority": j.prio, "retries": j.retries,
                "total": len(t), "ok": c["OK"], "ko": c["KO"], "unreachable": c["UNREACHABLE"],
                "pending": len(t) - len(j.res), "created": j.created, "deadline": j.deadline,
                "parallel": min(self.kmax, j.k or self.kmax), "mode": j.mode or self.mode,
                "multicast": self.mc is not None and self.mc.job is j}
        if self.mc is not None and self.mc.job is j:
            out["repair_round"] = self.mc.round
        return out

    def h_job_status(self, req):
        if "job" in req:
            out = [self._status(self._job(req))]
        else:
            out = [self._status(j) for j in sorted(self.jobs.values(), key=lambda j: j.id)]
        return {"jobs": out, "heap_peak": self.heap_peak, "heap_live_peak": self.live_peak,
                "meters_at_once": len(self.work), "requests": self.nreq, "resent": self.nretx,
                "xor_packets": self.xpackets, "xor_blocks": self.xblocks}

    def h_job_cancel(self, req):
        j = self._job(req)
        if not j.cancelled:
            self._write({"k": "can", "j": j.id})
        return {}

    def h_job_results(self, req):
        j = self._job(req)
        start = arg(req, "start", int, 0)
        out = []
        seen = [0]

        order = [0]

        def take(r):
            order[0] += 1  # position in the log: the order results were reached in
            if r.get("k") == "res" and r["j"] == j.id:
                if seen[0] >= start and len(out) < RESULTS_PAGE:
                    e = {"meter": r["m"], "result": r["s"], "reason": r.get("rs", ""), "attempts": r.get("a", 0),
                         "t": r.get("t", 0), "order": order[0]}
                    if "v" in r:
                        e["via"] = r["v"]  # how the image reached the meter: multicast | unicast | none
                        e["unicast_bytes"] = r.get("u", 0)
                        e["xor_blocks"] = r.get("x", 0)  # blocks it got from the broadcast repair rounds
                    if "rec" in r:
                        e["rec"] = bytes(r["rec"])
                        e["mac"] = bytes(r["mac"])
                    out.append(e)
                seen[0] += 1

        joblog.JobLog(self.log.bdev).replay(take)
        resp = {"results": out}
        if start + len(out) < seen[0]:
            resp["next"] = start + len(out)
        return resp


def register(disp, ctx):
    e = Engine(ctx, disp)
    disp.register(GROUP, CMD_METERS, e.h_meters, None)
    disp.register(GROUP, CMD_STORE, None, e.h_store)
    disp.register(GROUP, CMD_STORE_INFO, e.h_store_info, None)
    disp.register(GROUP, CMD_JOB_CREATE, None, e.h_job_create)
    disp.register(GROUP, CMD_JOB_STATUS, e.h_job_status, None)
    disp.register(GROUP, CMD_JOB_CANCEL, None, e.h_job_cancel)
    disp.register(GROUP, CMD_JOB_RESULTS, e.h_job_results, None)
    return e
