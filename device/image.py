# MCUboot image format, as `imgtool sign` writes it: a 32-byte header, the payload,
# an optional protected TLV area and the unprotected TLV area. The SHA256 TLV
# covers [0, hdr_size + img_size + protect_tlv_size) and is the image's hash.
from micropython import const
import struct
import hashlib

MAGIC = const(0x96F3B83D)
HEADER_SIZE = const(32)
TLV_INFO_MAGIC = const(0x6907)
TLV_PROT_INFO_MAGIC = const(0x6908)

TLV_KEYHASH = const(0x01)
TLV_SHA256 = const(0x10)
TLV_ED25519 = const(0x24)
TLV_SEC_CNT = const(0x50)
TLV_KIND = const(0xA2)  # meterota's (protected): b"firmware" = a native firmware, not a bundle

F_ENCRYPTED = const(0x0C)  # ENC_AES128 | ENC_AES256
F_NON_BOOTABLE = const(0x10)
F_RAM_LOAD = const(0x20)


class Header:
    # Fields of the 32-byte header that matter to us.
    def __init__(self, buf):
        (magic, _load, self.hdr_size, self.prot_size, self.img_size, self.flags,
         vmaj, vmin, vrev, vbuild) = struct.unpack_from("<IIHHIIBBHI", buf)
        if magic != MAGIC:
            raise ValueError("magic")
        self.version = (vmaj, vmin, vrev, vbuild)

    @property
    def hashed_size(self):
        return self.hdr_size + self.img_size + self.prot_size

    @property
    def payload_end(self):
        return self.hdr_size + self.img_size


def version_str(v):
    """Zephyr's form for SMP state: maj.min.rev, plus .build when build != 0."""
    s = "%d.%d.%d" % (v[0], v[1], v[2])
    return s + (".%d" % v[3]) if v[3] else s


def version_full(v):
    """imgtool's form, used in confirmation records: maj.min.rev+build."""
    return "%d.%d.%d+%d" % v


def version_key(v):
    return (v[0], v[1], v[2], v[3])


def pack_version(v):
    return struct.pack("<BBHI", v[0], v[1], v[2], v[3])


def unpack_version(b):
    return struct.unpack("<BBHI", b)


class Info:
    """What a verified slot holds."""

    def __init__(self, hdr, digest, tlvs, size):
        self.hdr = hdr
        self.version = hdr.version
        self.hash = digest  # the SHA256 TLV value, checked against the data
        self.size = size  # bytes up to the end of the TLVs
        self.tlvs = tlvs  # {type: value bytes} for the TLVs we keep

    @property
    def bootable(self):
        return not (self.hdr.flags & F_NON_BOOTABLE)


_KEEP = (TLV_SHA256, TLV_KEYHASH, TLV_ED25519, TLV_SEC_CNT, TLV_KIND)


def read_tlvs(read, start, limit):
    """Walk the TLV areas that start at `start` (protected, then unprotected).

    read(off, n) -> bytes. Returns ({type: value}, end offset) or raises ValueError.
    Only small TLVs we use are kept; a duplicated SHA256 TLV is refused (as Zephyr does)."""
    out = {}
    off = start
    expect = (TLV_PROT_INFO_MAGIC, TLV_INFO_MAGIC)
    for magic in expect:
        if off + 4 > limit:
            if magic == TLV_PROT_INFO_MAGIC:
                continue
            raise ValueError("no tlv")
        m, tot = struct.unpack("<HH", read(off, 4))
        if m != magic:
            if magic == TLV_PROT_INFO_MAGIC:
                continue
            raise ValueError("tlv magic")
        end = off + tot
        if tot < 4 or end > limit:
            raise ValueError("tlv size")
        p = off + 4
        while p < end:
            if p + 4 > end:
                raise ValueError("tlv")
            t, ln = struct.unpack("<HH", read(p, 4))
            if p + 4 + ln > end:
                raise ValueError("tlv len")
            if t in _KEEP and ln <= 64:
                if t == TLV_SHA256 and t in out:
                    raise ValueError("two hashes")
                out[t] = read(p + 4, ln)
            p += 4 + ln
        off = end
    return out, off


def verify(src, limit, chunk):
    """Check the image at the start of a slot; returns Info or None.

    src has read(off, n) -> bytes and readinto(off, mv); the hashed range goes
    through `chunk` (a preallocated bytearray), so no allocation per block."""
    read = src.read
    try:
        hdr = Header(read(0, HEADER_SIZE))
        end = hdr.hashed_size
        if hdr.hdr_size < HEADER_SIZE or end > limit:
            return None
        prot_start = hdr.payload_end
        tlvs, tlv_end = read_tlvs(read, prot_start, limit)
        if prot_start + hdr.prot_size > tlv_end:
            return None
        want = tlvs.get(TLV_SHA256)
        if want is None or len(want) != 32:
            return None
        h = hashlib.sha256()
        mv = memoryview(chunk)
        pos = 0
        while pos < end:
            n = min(len(chunk), end - pos)
            src.readinto(pos, mv[:n])
            h.update(mv[:n])
            pos += n
        digest = h.digest()
        if digest != want:
            return None
        return Info(hdr, digest, tlvs, tlv_end)
    except (ValueError, OSError):
        return None
