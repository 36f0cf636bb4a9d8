# The confirmation record: the device's signed statement of how a test ended.
#
# rec = canonical CBOR map {id, seq, res, rsn, hash, ver, prev, boots, t}
# mac = HMAC-SHA256(device key, rec)
# The bytes are rebuilt the same way from the boot state every time, so a
# concentrator can relay them unchanged and the host checks the MAC over the
# exact bytes it received.
import hashlib
import cbor
import image
import bootstate

_BLOCK = 64


def hmac_sha256(key, msg):
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    k = bytearray(_BLOCK)
    k[:len(key)] = key
    ipad = bytearray(_BLOCK)
    opad = bytearray(_BLOCK)
    for i in range(_BLOCK):
        ipad[i] = k[i] ^ 0x36
        opad[i] = k[i] ^ 0x5C
    inner = hashlib.sha256(ipad)
    inner.update(msg)
    outer = hashlib.sha256(opad)
    outer.update(inner.digest())
    return outer.digest()


def build(device_id, st):
    """(rec, mac-less) record bytes for the latest outcome, or None if none yet."""
    if st.result == bootstate.RES_NONE:
        return None
    return bytes(cbor.dumps({
        "id": device_id,
        "seq": st.rseq,
        "res": "OK" if st.result == bootstate.RES_OK else "KO",
        "rsn": st.reason,
        "hash": st.rhash,
        "ver": image.version_full(image.unpack_version(st.rver)),
        "prev": image.version_full(image.unpack_version(st.rprev)),
        "boots": st.rboots,
        "t": st.rtime,
    }))
