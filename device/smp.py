# SMP (MCUmgr) message layer: the 8-byte header, dispatch to group handlers and
# the two error forms (v1 {rc}, v2 {err: {group, rc}}).
from micropython import const
import gc
import struct
import sys
import cbor

OP_READ = const(0)
OP_READ_RSP = const(1)
OP_WRITE = const(2)
OP_WRITE_RSP = const(3)
HDR_SIZE = const(8)

# MGMT_ERR: the SMP layer's own codes, valid in both protocol versions.
EOK = const(0)
EUNKNOWN = const(1)
ENOMEM = const(2)
EINVAL = const(3)
ETIMEOUT = const(4)
ENOENT = const(5)
EBADSTATE = const(6)
EMSGSIZE = const(7)
ENOTSUP = const(8)
ECORRUPT = const(9)
EBUSY = const(10)
EACCESSDENIED = const(11)
UNSUPPORTED_TOO_OLD = const(12)
UNSUPPORTED_TOO_NEW = const(13)

GROUP_OS = const(0)
GROUP_IMAGE = const(1)
GROUP_METEROTA = const(64)


class MgmtError(Exception):
    """An SMP-layer error: always answered as a plain {rc}."""

    def __init__(self, rc):
        self.rc = rc


class GroupError(Exception):
    """A group-specific error: v2 {err: {group, rc}}, v1 translated {rc}."""

    def __init__(self, rc, group=None):
        self.rc = rc
        self.group = group  # when the codes are another group's (default: the request's)


def call_lazy(module, name, *args):
    """module.name(*args), with `module` (and whatever it imports) loaded for
    this call only: code a device rarely runs is not in RAM the rest of the
    time, since on stock firmware a module's bytecode lives in the heap."""
    had = list(sys.modules)
    try:
        return getattr(__import__(module), name)(*args)
    finally:
        for k in list(sys.modules):
            if k not in had:
                del sys.modules[k]


class Dispatcher:
    def __init__(self):
        self._handlers = {}
        self._v1 = {}
        self.origin = None  # who sent the request being handled (link, peer)
        self.heap_peak = 0  # most heap in use (live and not yet collected) at the end of a request

    def register(self, group, cmd, read=None, write=None):
        self._handlers[(group << 8) | cmd] = (read, write)

    def register_lazy(self, group, cmd, module, read=None, write=None, obj=None):
        """A handler that lives in `module`, imported for each request and
        released after (call_lazy): module.<read|write>(obj, req)."""
        self._handlers[(group << 8) | cmd] = (read, write, module, obj)

    def set_v1_translation(self, group, fn):
        """fn(group_rc) -> MGMT_ERR for requests that speak SMP v1."""
        self._v1[group] = fn

    def handle(self, frame, origin=None):
        """Answer one request frame; returns the response frame, or None to stay silent."""
        self.origin = origin
        if len(frame) < HDR_SIZE:
            return None
        b0, _flags, length, group, seq, cmd = struct.unpack_from(">BBHHBB", frame)
        op = b0 & 7
        ver = (b0 >> 3) & 3
        if op != OP_READ and op != OP_WRITE:
            return None  # a response or garbage: never answer those
        if ver > 1:
            return _reply(1, op, group, seq, cmd, {"rc": UNSUPPORTED_TOO_NEW})
        try:
            if length != len(frame) - HDR_SIZE:
                raise MgmtError(EINVAL)
            entry = self._handlers.get((group << 8) | cmd)
            fn = None if entry is None else entry[0 if op == OP_READ else 1]
            if fn is None:
                raise MgmtError(ENOTSUP)
            if length:
                try:
                    req = cbor.loads(memoryview(frame)[HDR_SIZE:])
                except ValueError:
                    raise MgmtError(EINVAL)
                if not isinstance(req, dict):
                    raise MgmtError(EINVAL)
            else:
                req = {}
            body = fn(req) if len(entry) == 2 else call_lazy(entry[2], fn, entry[3], req)
            if body is None:
                return None  # a request that is never answered (a multicast block)
            req = None  # the reply may need the room the request took
        except GroupError as e:
            g = group if e.group is None else e.group
            if ver == 0:
                tr = self._v1.get(g)
                body = {"rc": tr(e.rc) if tr else EUNKNOWN}
            else:
                body = {"err": {"group": g, "rc": e.rc}}
        except MgmtError as e:
            body = {"rc": e.rc}
        except MemoryError:
            body = {"rc": ENOMEM}
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):
            # A field of the wrong type or shape: the request is malformed.
            body = {"rc": EINVAL}
        except Exception as e:  # noqa: whatever a request does, the receiver stays up
            print("meterota: request failed:", repr(e))
            body = {"rc": EUNKNOWN}
        a = gc.mem_alloc()
        if a > self.heap_peak:
            self.heap_peak = a
        return _reply(ver, op, group, seq, cmd, body)


def _reply(ver, op, group, seq, cmd, body):
    out = bytearray(HDR_SIZE)
    try:
        cbor.dumps(body, out)
    except MemoryError:
        out = None
        body = None
        gc.collect()
        out = bytearray(HDR_SIZE)
        cbor.dumps({"rc": ENOMEM}, out)
    except ValueError as e:  # a handler returned something CBOR cannot carry
        print("meterota: reply not encodable:", repr(e))
        out = bytearray(HDR_SIZE)
        cbor.dumps({"rc": EUNKNOWN}, out)
    struct.pack_into(">BBHHBB", out, 0, (ver << 3) | (op + 1), 0, len(out) - HDR_SIZE, group, seq, cmd)
    return out


def arg(req, key, kind, default=None):
    """A request field checked for type; a wrong type is EINVAL."""
    v = req.get(key, default)
    if v is not default and not isinstance(v, kind):
        raise MgmtError(EINVAL)
    return v
