# Ed25519 signature verification (RFC 8032, section 5.1.7) in pure MicroPython.
#
# Verification only; everything it handles is public, so nothing here needs
# to be constant time.  Written for speed under MicroPython, where the cost
# is mostly interpreter dispatch and heap allocation per bigint operation,
# not the digit arithmetic itself:
#  - points in extended twisted Edwards coordinates (X:Y:Z:T), no inversion
#    until the single one needed to encode the result;
#  - [s]B + [k](-A) by interleaved width-w NAF (Straus): one shared chain of
#    ~253 doublings plus ~42 + ~51 additions;
#  - odd multiples of B are computed on first use and kept (~2 KB);
#  - products are reduced by folding at 2^255 instead of "% p", sums and
#    differences are not reduced at all;
#  - the doubling/addition formulas are inlined in the main loop, as a Python
#    function call costs about as much as a field multiplication;
#  - inversion and square root use an addition chain, not pow(x, e, p).
# The check is the cofactorless [S]B == R + [k]A, which RFC 8032 allows, done
# by comparing the encoding of [S]B - [k]A with the R bytes (so R is never
# decoded, and a non-canonical R can never match).

from sha512 import sha512

try:
    from micropython import const
except ImportError:  # CPython, for quick checks only

    def const(x):
        return x


_WB = const(5)  # wNAF width for the base B: 1 << (_WB - 2) points, kept
_WA = const(4)  # wNAF width for the key A: table built per call

_P = 2**255 - 19
# Group order.
_L = 2**252 + 27742317777372353535851937790883648493
# Curve constant d = -121665/121666 mod p, and 2*d.
_D = 0x52036CEE2B6FFE738CC740797779E89800700A4D4141D8AB75EB4DCA135978A3
_D2 = 0x2406D9DC56DFFCE7198E80F2EEF3D13000E0149A8283B156EBD69B9426B2F159
# A square root of -1: 2^((p-1)/4) mod p.
_SQRTM1 = 0x2B8324804FC1DF0B2B4D00993DFBD7A72F431806AD2FE478C4EE1B274A0EA0B0
# Base point B: y = 4/5, x even.
_BX = 0x216936D3CD6E53FEC0A4E231FDD6DC5C692CC7609525A7B2C9562D608F25D51A
_BY = 0x6666666666666666666666666666666666666666666666666666666666666658

_M255 = (1 << 255) - 1

_btab = None  # odd multiples of B, built on first use


def _sq(x, n):
    # x^(2^n).  Two folds at 2^255 (2^255 = 19 mod p) instead of "% p": the
    # result stays below 2^256 (and above -2^14), good enough for the next
    # product, and it is ~20% quicker than a division in MicroPython.
    m = _M255
    for _ in range(n):
        x = x * x
        x = (x & m) + (x >> 255) * 19
        x = (x & m) + (x >> 255) * 19
    return x


def _pow2_250(z):
    # z^(2^250 - 1) and z^11 by a fixed addition chain: 254 squarings and
    # 11 multiplications, about twice as fast as the builtin 3-arg pow(),
    # which also is not in every port.
    p = _P
    z2 = z * z % p
    z9 = _sq(z2, 2) * z % p
    z11 = z9 * z2 % p
    a = z11 * z11 % p * z9 % p  # 2^5 - 1
    b = _sq(a, 5) * a % p  # 2^10 - 1
    c = _sq(b, 10) * b % p  # 2^20 - 1
    c = _sq(c, 20) * c % p  # 2^40 - 1
    c = _sq(c, 10) * b % p  # 2^50 - 1
    d = _sq(c, 50) * c % p  # 2^100 - 1
    d = _sq(d, 100) * d % p  # 2^200 - 1
    return _sq(d, 50) * c % p, z11  # 2^250 - 1


def _inv(z):
    # z^(p-2) = z^-1; p - 2 = (2^250 - 1) * 2^5 + 11.
    t, z11 = _pow2_250(z)
    return _sq(t, 5) * z11 % _P


def _decode(s):
    # RFC 8032 5.1.3: 32 bytes -> affine (x, y), or None if not a point.
    p = _P
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= _M255
    if y >= p:
        return None
    yy = y * y % p
    u = yy - 1
    v = _D * yy + 1
    # Candidate root x = u v^3 (u v^7)^((p-5)/8), valid as p = 5 mod 8.
    v3 = v * v % p * v % p
    uv3 = u * v3 % p
    # (p-5)/8 = (2^250 - 1) * 4 + 1.
    t = uv3 * v3 % p * v % p
    x = _sq(_pow2_250(t)[0], 2) * t % p
    x = uv3 * x % p
    vxx = v * x % p * x % p
    if vxx != u % p:
        if (vxx + u) % p:
            return None
        x = x * _SQRTM1 % p
    if x & 1 != sign:
        if not x:
            return None
        x = p - x
    return x, y


def _cached(X, Y, Z, T):
    # Point in the form the addition formula consumes: (Y+X, Y-X, 2dT, 2Z).
    p = _P
    return (Y + X) % p, (Y - X) % p, T * _D2 % p, (Z + Z) % p


def _add(X, Y, Z, T, q):
    # Extended + cached point (RFC 8032 5.1.4), only used for the tables.
    p = _P
    yp, ym, t2, z2 = q
    a = (Y - X) * ym % p
    b = (Y + X) * yp % p
    c = T * t2 % p
    d = Z * z2 % p
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return e * f % p, g * h % p, f * g % p, e * h % p


def _odd_multiples(x, y, n):
    # [1]P, [3]P, ..., [2n-1]P of the affine point P, in cached form.
    p = _P
    X, Y, Z, T = x, y, 1, x * y % p
    out = [_cached(X, Y, Z, T)]
    # 2P by the doubling formula (needs no T).
    a = X * X % p
    b = Y * Y % p
    c = 2 * Z * Z % p
    h = a + b
    e = h - (X + Y) * (X + Y) % p
    g = a - b
    f = c + g
    twice = _cached(e * f % p, g * h % p, f * g % p, e * h % p)
    for _ in range(n - 1):
        X, Y, Z, T = _add(X, Y, Z, T, twice)
        out.append(_cached(X, Y, Z, T))
    return out


def _wnaf(n, w):
    # Width-w NAF of 0 <= n < 2^253 as a bytearray of 256 signed digits
    # (two's complement bytes), least significant first.  Uses small ints
    # only: c is the pending carry, so the value still to be written is
    # (n >> i) + c at every step.
    b = n.to_bytes(34, "little")
    out = bytearray(256)
    full = 1 << w
    half = full >> 1
    mask = full - 1
    c = 0
    for i in range(256):
        j = i >> 3
        bit = (b[j] >> (i & 7)) & 1
        if (bit + c) & 1:
            d = (((b[j] | b[j + 1] << 8) >> (i & 7)) + c) & mask
            if d >= half:
                d -= full
            out[i] = d & 0xFF
            c -= d
        c = (bit + c) >> 1
    return out


def _double_scalar(s, k, ax, ay):
    # [s]B + [k]A for the affine point A = (ax, ay); returns projective
    # (X, Y, Z), coordinates not fully reduced.
    # Every product below is reduced by two folds at 2^255 (see _sq): written
    # out inline because a function call costs as much as the arithmetic.
    # All values stay within (-2^14, 2^256), sums of two within 2^257.
    global _btab
    if _btab is None:
        _btab = _odd_multiples(_BX, _BY, 1 << (_WB - 2))
    bt = _btab
    at = _odd_multiples(ax, ay, 1 << (_WA - 2))
    sd = _wnaf(s, _WB)
    kd = _wnaf(k, _WA)
    m = _M255
    i = 255
    while i >= 0 and not (sd[i] or kd[i]):
        i -= 1
    X, Y, Z, T = 0, 1, 1, 0
    while i >= 0:
        ds = sd[i]
        dk = kd[i]
        # Q = 2Q (RFC 8032 5.1.4).  T only when an addition follows.
        a = X * X
        a = (a & m) + (a >> 255) * 19
        a = (a & m) + (a >> 255) * 19
        b = Y * Y
        b = (b & m) + (b >> 255) * 19
        b = (b & m) + (b >> 255) * 19
        c = Z * Z
        c = (c & m) + (c >> 255) * 19
        c = (c & m) + (c >> 255) * 19
        h = a + b
        e = X + Y
        e = e * e
        e = (e & m) + (e >> 255) * 19
        e = h - (e & m) - (e >> 255) * 19
        g = a - b
        f = c + c + g
        X = e * f
        X = (X & m) + (X >> 255) * 19
        X = (X & m) + (X >> 255) * 19
        Y = g * h
        Y = (Y & m) + (Y >> 255) * 19
        Y = (Y & m) + (Y >> 255) * 19
        Z = f * g
        Z = (Z & m) + (Z >> 255) * 19
        Z = (Z & m) + (Z >> 255) * 19
        if ds or dk:
            T = e * h
            T = (T & m) + (T >> 255) * 19
            T = (T & m) + (T >> 255) * 19
        if ds:
            # Q += [ds]B from the table of odd multiples; a negative digit
            # uses -P = (Y-X, Y+X, -2dT, 2Z).
            if ds < 128:
                yp, ym, t2, z2 = bt[ds >> 1]
            else:
                ym, yp, t2, z2 = bt[(256 - ds) >> 1]
                t2 = -t2
            a = (Y - X) * ym
            a = (a & m) + (a >> 255) * 19
            a = (a & m) + (a >> 255) * 19
            b = (Y + X) * yp
            b = (b & m) + (b >> 255) * 19
            b = (b & m) + (b >> 255) * 19
            c = T * t2
            c = (c & m) + (c >> 255) * 19
            c = (c & m) + (c >> 255) * 19
            d = Z * z2
            d = (d & m) + (d >> 255) * 19
            d = (d & m) + (d >> 255) * 19
            e = b - a
            f = d - c
            g = d + c
            h = b + a
            X = e * f
            X = (X & m) + (X >> 255) * 19
            X = (X & m) + (X >> 255) * 19
            Y = g * h
            Y = (Y & m) + (Y >> 255) * 19
            Y = (Y & m) + (Y >> 255) * 19
            Z = f * g
            Z = (Z & m) + (Z >> 255) * 19
            Z = (Z & m) + (Z >> 255) * 19
            if dk:
                T = e * h
                T = (T & m) + (T >> 255) * 19
                T = (T & m) + (T >> 255) * 19
        if dk:
            # Q += [dk](-A), same formula.
            if dk < 128:
                yp, ym, t2, z2 = at[dk >> 1]
            else:
                ym, yp, t2, z2 = at[(256 - dk) >> 1]
                t2 = -t2
            a = (Y - X) * ym
            a = (a & m) + (a >> 255) * 19
            a = (a & m) + (a >> 255) * 19
            b = (Y + X) * yp
            b = (b & m) + (b >> 255) * 19
            b = (b & m) + (b >> 255) * 19
            c = T * t2
            c = (c & m) + (c >> 255) * 19
            c = (c & m) + (c >> 255) * 19
            d = Z * z2
            d = (d & m) + (d >> 255) * 19
            d = (d & m) + (d >> 255) * 19
            e = b - a
            f = d - c
            g = d + c
            h = b + a
            X = e * f
            X = (X & m) + (X >> 255) * 19
            X = (X & m) + (X >> 255) * 19
            Y = g * h
            Y = (Y & m) + (Y >> 255) * 19
            Y = (Y & m) + (Y >> 255) * 19
            Z = f * g
            Z = (Z & m) + (Z >> 255) * 19
            Z = (Z & m) + (Z >> 255) * 19
        i -= 1
    return X, Y, Z


def _verify(pk, msg, sig):
    if len(pk) != 32 or len(sig) != 64:
        return False
    sig = bytes(sig)
    r = sig[:32]
    s = int.from_bytes(sig[32:], "little")
    if s >= _L:  # non-canonical S: reject (malleability)
        return False
    pk = bytes(pk)
    a = _decode(pk)
    if a is None:
        return False
    h = sha512(r)
    h.update(pk)
    h.update(msg)
    k = int.from_bytes(h.digest(), "little") % _L
    del h  # its 80-word schedule is ~3 KB of bigints
    # R == [S]B - [k]A  <=>  encode([S]B + [k](-A)) == R bytes.
    p = _P
    X, Y, Z = _double_scalar(s, k, p - a[0], a[1])
    zi = _inv(Z)
    x = X * zi % p
    y = Y * zi % p
    return int.from_bytes(r, "little") == y | (x & 1) << 255


def verify(public_key, message, signature):
    """True iff signature (64 bytes) is a valid Ed25519 signature of message
    under public_key (32 bytes).  Never raises: bad input gives False."""
    try:
        return _verify(public_key, message, signature)
    except Exception:
        return False
