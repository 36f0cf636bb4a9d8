# What the device accepts of a whole image: signed with its provisioned key
# (Ed25519 as `imgtool sign` makes it: over the 32-byte image hash), and a
# security counter not below the confirmed image's unless the configuration
# allows downgrades (the version rule comes earlier, at the first chunk:
# imgcheck.check_version). Loaded for each check (updater.Updater.check_image).
import gc
import hashlib
import struct
import sys
import image
from updater import Refused

# DER SubjectPublicKeyInfo prefix of an Ed25519 key: KEYHASH = SHA-256(prefix + key).
_ED25519_SPKI = b"\x30\x2a\x30\x05\x06\x03\x2b\x65\x70\x03\x21\x00"


def _keyhash(pubkey):
    return hashlib.sha256(_ED25519_SPKI + pubkey).digest()


def _pubkey(cfg):
    pk = cfg.get("pubkey")
    return bytes.fromhex(pk) if pk else None


def check_image(cfg, trusted, info, running):
    """Once the whole image is in flash (and again before it may boot). `trusted`:
    the hashes whose signature verified in this run, kept by the caller."""
    if running is not None and not cfg.get("allow_downgrade", False):
        new = _counter(info)
        old = _counter(running)
        if old is not None and (new is None or new < old):
            raise Refused("downgrade")
    pubkey = _pubkey(cfg)
    if pubkey is None or info.hash in trusted:
        return
    sig = info.tlvs.get(image.TLV_ED25519)
    if sig is None or len(sig) != 64:
        raise Refused("unsigned")
    kh = info.tlvs.get(image.TLV_KEYHASH)
    if kh is not None and bytes(kh) != _keyhash(pubkey):
        raise Refused("wrong-key")
    import ed25519

    try:
        ok = ed25519.verify(pubkey, info.hash, bytes(sig))
    finally:
        # A verify is rare (once per image) and its code is large: give
        # its RAM back to the receiver's buffers instead of keeping it.
        del ed25519
        for m in ("ed25519", "sha512"):
            sys.modules.pop(m, None)
        gc.collect()
    if not ok:
        raise Refused("bad-signature")
    trusted.append(bytes(info.hash))


def _counter(info):
    v = info.tlvs.get(image.TLV_SEC_CNT)
    if v is None or len(v) != 4:
        return None
    return struct.unpack("<I", v)[0]
