# Minimal CBOR (RFC 8949) for SMP bodies: ints, bytes, text, arrays, maps,
# bool and null. Decoding returns byte strings as memoryview slices of the
# input so upload chunks are never copied. Maps are encoded canonically
# (keys sorted by length, then bytewise), exactly as smp's canonical=True,
# so the same value encodes to the same bytes on the device and the host.
from micropython import const

_MAX_DEPTH = const(8)
_MAX_ITEMS = const(512)  # per array or map: SMP bodies are small; a huge count is an attack


class CBORError(ValueError):
    pass


def _head(out, major, n):
    m = major << 5
    if n < 24:
        out.append(m | n)
    elif n < 0x100:
        out.append(m | 24)
        out.append(n)
    elif n < 0x10000:
        out.append(m | 25)
        out.extend(n.to_bytes(2, "big"))
    elif n < 0x100000000:
        out.append(m | 26)
        out.extend(n.to_bytes(4, "big"))
    else:
        out.append(m | 27)
        out.extend(n.to_bytes(8, "big"))


def _key_order(item):
    k = _enc_key(item[0])
    return (len(k), k)


def _enc_key(k):
    b = bytearray()
    _encode(b, k, 0)
    return bytes(b)


def _encode(out, v, depth):
    if depth > _MAX_DEPTH:
        raise CBORError("depth")
    if v is True:
        out.append(0xF5)
    elif v is False:
        out.append(0xF4)
    elif v is None:
        out.append(0xF6)
    elif isinstance(v, int):
        if v >= 0:
            _head(out, 0, v)
        else:
            _head(out, 1, -1 - v)
    elif isinstance(v, str):
        b = v.encode()
        _head(out, 3, len(b))
        out.extend(b)
    elif isinstance(v, (bytes, bytearray, memoryview)):
        _head(out, 2, len(v))
        out.extend(v)
    elif isinstance(v, (list, tuple)):
        _head(out, 4, len(v))
        for x in v:
            _encode(out, x, depth + 1)
    elif isinstance(v, dict):
        items = list(v.items())
        if len(items) > 1:
            items.sort(key=_key_order)
        _head(out, 5, len(items))
        for k, x in items:
            _encode(out, k, depth + 1)
            _encode(out, x, depth + 1)
    else:
        raise CBORError("type")


def dumps(v, out=None):
    """Encode v; append to bytearray `out` if given (returns it)."""
    if out is None:
        out = bytearray()
    _encode(out, v, 0)
    return out


def _arg(buf, pos, info):
    # Returns (value, new_pos); info 31 (indefinite) is returned as -1.
    if info < 24:
        return info, pos
    if info == 24:
        return buf[pos], pos + 1
    if info == 25:
        return (buf[pos] << 8) | buf[pos + 1], pos + 2
    if info == 26:
        return int.from_bytes(bytes(buf[pos:pos + 4]), "big"), pos + 4
    if info == 27:
        return int.from_bytes(bytes(buf[pos:pos + 8]), "big"), pos + 8
    if info == 31:
        return -1, pos
    raise CBORError("info")


def _decode(buf, pos, end, depth):
    if pos >= end:
        raise CBORError("short")
    if depth > _MAX_DEPTH:
        raise CBORError("depth")
    ib = buf[pos]
    major = ib >> 5
    n, pos = _arg(buf, pos + 1, ib & 0x1F)
    if pos > end:
        raise CBORError("short")
    if n < 0 and major < 4:
        raise CBORError("indefinite")
    if major == 0:
        return n, pos
    if major == 1:
        return -1 - n, pos
    if major == 2 or major == 3:
        if pos + n > end:
            raise CBORError("short")
        v = buf[pos:pos + n]
        if major == 3:
            try:
                v = str(v, "utf-8")
            except UnicodeError:
                raise CBORError("utf-8")
        return v, pos + n
    if major >= 4 and major <= 5 and n > _MAX_ITEMS:
        raise CBORError("too many items")
    if major == 4:
        out = []
        while n != 0:
            if n < 0 and pos < end and buf[pos] == 0xFF:
                return out, pos + 1
            if len(out) >= _MAX_ITEMS:
                raise CBORError("too many items")
            v, pos = _decode(buf, pos, end, depth + 1)
            out.append(v)
            n -= 1
        return out, pos
    if major == 5:
        out = {}
        while n != 0:
            if n < 0 and pos < end and buf[pos] == 0xFF:
                return out, pos + 1
            if len(out) >= _MAX_ITEMS:
                raise CBORError("too many items")
            k, pos = _decode(buf, pos, end, depth + 1)
            if isinstance(k, memoryview):
                k = bytes(k)
            elif isinstance(k, (list, dict)):
                raise CBORError("key")
            v, pos = _decode(buf, pos, end, depth + 1)
            out[k] = v
            n -= 1
        return out, pos
    if major == 7:
        info = ib & 0x1F
        if info == 20:
            return False, pos
        if info == 21:
            return True, pos
        if info == 22 or info == 23:
            return None, pos
        raise CBORError("simple")
    # major 6 (tags) carries nothing SMP uses.
    raise CBORError("tag")


def loads(buf):
    """Decode one CBOR item that must fill `buf` exactly.

    Byte strings come back as memoryview slices of `buf`."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    try:
        v, pos = _decode(mv, 0, len(mv), 0)
    except IndexError:
        raise CBORError("short")
    if pos != len(mv):
        raise CBORError("trailing")
    return v
