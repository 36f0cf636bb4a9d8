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
CHUNK = const(1024)  # bytes of image per request to a meter
RESULTS_PAGE = const(4)
METERS_PAGE = const(16)
BACKOFF_MS = const(1000)
PROBE_MS = const(15000)

_BYTES = (bytes, bytearray, memoryview)


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
        self.working = None  # the job whose meter attempt is in flight (the host is served meanwhile)
        self.probe_at = time.ticks_ms()
        self.probe_i = 0
        self.buf = bytearray(CHUNK)
        self.uploader = StoreUpload(self, disp)

    # -- the log -------------------------------------------------------------------
    def _apply(self, r):
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
        # Only the meter being worked on has a peer: memory does not grow with the fleet.
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

    # -- the engine (called from the serve loop) -------------------------------
    def _due(self):
        """(job, meter) for the next attempt, (job, None) for a job past its
        deadline or window, or None when nothing is due."""
        now = time.time()
        tk = time.ticks_ms()
        for j in self.active_jobs():
            if now < j.not_before:
                continue
            if now > j.deadline or (j.not_after and now > j.not_after):
                return j, None
            for mid in self.targets(j):
                if mid not in j.res and time.ticks_diff(tk, self.next_try.get((j.id, mid), tk)) >= 0:
                    return j, mid
        return None

    def has_work(self):
        return self._due() is not None

    def poll(self):
        due = self._due()
        if due is not None:
            j, mid = due
            if mid is None:
                self._expire(j)
                return
            gc.collect()  # one attempt allocates; start each from a clean heap
            self.working = j.id
            try:
                self._attempt(j, mid)
            except MemoryError:
                gc.collect()
                self._failed(j, mid, "KO", "concentrator out of memory", None, None)
            finally:
                self.working = None
            return  # one meter per call: the host is served in between
        tk = time.ticks_ms()
        if self.meters and time.ticks_diff(tk, self.probe_at) >= 0:
            self.probe_at = time.ticks_add(tk, PROBE_MS // max(1, len(self.meters)))
            m = self.meters[self.probe_i % len(self.meters)]
            self.probe_i += 1
            try:
                self._mark(m["id"], self.peer(m["id"]).request(OP_READ, 64, 0, {}, 500, 0))
            except (PeerTimeout, PeerError, ValueError):
                self._mark(m["id"], None)

    def _expire(self, j):
        for mid in self.targets(j):
            if mid not in j.res:
                kind, why = self.lastfail.get((j.id, mid), ("SILENT", "not reached before the deadline"))
                self._result(j, mid, "UNREACHABLE" if kind == "SILENT" else "KO", why, None, None)

    def _result(self, j, mid, res, why, rec, mac):
        r = {"k": "res", "j": j.id, "m": mid, "s": res, "rs": why[:64], "a": j.att.get(mid, 0) + (res == "OK"),
             "t": int(time.time())}
        if rec is not None:
            r["rec"] = rec
            r["mac"] = mac
        self._write(r)

    def _attempt(self, j, mid):
        res, why, rec, mac = self.upgrade(j, mid)
        if res == "OK":
            self._result(j, mid, "OK", why, rec, mac)
            return
        self._failed(j, mid, res, why, rec, mac)

    def _failed(self, j, mid, res, why, rec, mac):
        n = j.att.get(mid, 0) + 1
        self._write({"k": "att", "j": j.id, "m": mid, "a": n})
        self.lastfail[(j.id, mid)] = (res, why)
        if n > j.retries:
            self._result(j, mid, "UNREACHABLE" if res == "SILENT" else "KO", why, rec, mac)
        else:
            self.next_try[(j.id, mid)] = time.ticks_add(time.ticks_ms(), min(60000, BACKOFF_MS << (n - 1)))

    # -- one meter ----------------------------------------------------------------
    def upgrade(self, j, mid):
        """Upgrade one meter; returns (OK | KO | SILENT, reason, rec, mac)."""
        try:
            peer = self.peer(mid)
        except ValueError as e:
            return "KO", "bad link: %s" % e, None, None
        try:
            info = peer.request(OP_READ, 64, 0, {}, 1500, 1)
        except PeerTimeout:
            self._mark(mid, None)
            return "SILENT", "no answer", None, None
        except PeerError as e:
            return "KO", "not a meterota meter (rc %d)" % e.rc, None, None
        self._mark(mid, info)
        try:
            act = _active(info)
            if act.get("hash") == j.hash and not info.get("trial"):
                rec, mac = self._record(peer)
                return "OK", "already running this image", rec, mac
            before = self._seq(peer)
            if not (info.get("trial") and act.get("hash") == j.hash):
                if info.get("trial"):
                    return "KO", "meter is testing another image", None, None
                other = _other(info)
                if other.get("hash") != j.hash:
                    if other.get("pending"):
                        peer.request(OP_WRITE, 1, 5, {"slot": 1})
                    self._push(peer, info)
                peer.request(OP_WRITE, 1, 0, {"hash": j.hash, "confirm": False})
                boots = peer.request(OP_READ, 64, 0, {})["boots"]
                try:
                    peer.request(OP_WRITE, 0, 5, {}, 1000, 0)
                except PeerTimeout:
                    pass  # the reply may be lost; the boot counter tells
                info = self._wait_back(peer, boots)
                if info is None:
                    self._mark(mid, None)
                    return "SILENT", "no answer after reset into the test image", None, None
                self._mark(mid, info)
                act = _active(info)
            if act.get("hash") != j.hash:
                rec, mac = self._record(peer)
                why = "reverted"
                if rec is not None:
                    why = str(cbor.loads(rec).get("rsn", why))
                return "KO", why, rec, mac
            if info.get("trial"):
                if info.get("self_confirm"):
                    self._wait_confirmed(peer)
                else:
                    peer.request(OP_WRITE, 1, 0, {"confirm": True})
            rec, mac = self._record(peer)
            if rec is None:
                return "KO", "no confirmation record", None, None
            d = cbor.loads(rec)
            if d.get("seq", 0) <= before or bytes(d.get("hash", b"")) != j.hash:
                return "KO", "confirmation record is not about this upgrade", rec, mac
            self._mark(mid, peer.request(OP_READ, 64, 0, {}))
            return ("OK" if d.get("res") == "OK" else "KO"), str(d.get("rsn", "")), rec, mac
        except PeerTimeout:
            self._mark(mid, None)
            return "SILENT", "meter stopped answering", None, None
        except PeerError as e:
            return "KO", "meter refused: group %d rc %d" % (e.group, e.rc), None, None

    def _record(self, peer):
        try:
            r = peer.request(OP_READ, 64, 1, {})
        except PeerError:
            return None, None
        return bytes(r["rec"]), bytes(r["mac"])

    def _seq(self, peer):
        rec, _ = self._record(peer)
        return cbor.loads(rec).get("seq", 0) if rec is not None else 0

    def _wait_back(self, peer, boots):
        deadline = time.ticks_add(time.ticks_ms(), self.reset_s * 1000)
        while time.ticks_diff(deadline, time.ticks_ms()) > 0:
            try:
                info = peer.request(OP_READ, 64, 0, {}, 500, 0)
            except (PeerTimeout, PeerError):
                continue
            if info.get("boots", 0) > boots:
                return info
        return None

    def _wait_confirmed(self, peer):
        deadline = time.ticks_add(time.ticks_ms(), self.reset_s * 1000)
        while time.ticks_diff(deadline, time.ticks_ms()) > 0:
            if not peer.request(OP_READ, 64, 0, {}).get("trial"):
                return
            self.ctx.pump(100)
        raise PeerTimeout()

    def _push(self, peer, info):
        """Upload the stored image to a meter, resuming where it says."""
        s = self.store_session
        src = self.store[0]
        total = s.length
        n = min(CHUNK, int(info.get("buf_size", 512)) - 96)
        mv = memoryview(self.buf)
        src.readinto(0, mv[:n])
        r = peer.request(OP_WRITE, 1, 1, {"off": 0, "len": total, "sha": s.sha, "data": mv[:n], "image": 1,
                                         "upgrade": False}, 5000)
        off = r["off"]
        while off < total:
            k = min(n, total - off)
            src.readinto(off, mv[:k])
            r = peer.request(OP_WRITE, 1, 1, {"off": off, "data": mv[:k]}, 3000)
            nxt = r["off"]
            if nxt == 0:
                raise PeerError(1, 0)  # the meter lost the session; the retry starts over
            off = nxt
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
        if not (0 <= prio <= 255 and 0 <= retries <= 20 and duration > 0):
            raise MgmtError(smp.EINVAL)
        now = int(time.time())
        r = {"k": "job", "j": self.next_id, "h": inf.hash, "p": prio, "r": retries, "c": now, "d": now + duration}
        if targets is not None:
            r["t"] = [str(t) for t in targets]
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
        if st == "cancelled" and self.working == j.id:
            st = "cancelling"  # the meter in flight finishes first; its result is the job's
        return {"job": j.id, "hash": j.hash, "state": st, "priority": j.prio, "retries": j.retries,
                "total": len(t), "ok": c["OK"], "ko": c["KO"], "unreachable": c["UNREACHABLE"],
                "pending": len(t) - len(j.res), "created": j.created, "deadline": j.deadline}

    def h_job_status(self, req):
        if "job" in req:
            return {"jobs": [self._status(self._job(req))]}
        return {"jobs": [self._status(j) for j in sorted(self.jobs.values(), key=lambda j: j.id)]}

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
