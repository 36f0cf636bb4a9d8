# An upload's first chunk and its end: the header and size checks, the image
# kind's admission, the session start, the read-back verification and the
# policy's verdict. They come once per image, so this code is loaded for the
# call and released after (grp_image.ImageGroup._first/_finish, smp.call_lazy);
# the chunks between them run on grp_image's resident path alone.
#
# An image kind (grp_image.ImageGroup or a subclass: the concentrator's store,
# the ESP32's native firmware) may define `_admit(target, hdr, req)` and
# `_accept(info)`; without them the A/B slots' rules below apply.
import image
import upload
from smp import GroupError, arg
from updater import Refused
from grp_image import (NO_FREE_SLOT, FLASH_WRITE_FAILED, INVALID_LENGTH, INVALID_IMAGE_HEADER,
                       INVALID_IMAGE_HEADER_MAGIC, INVALID_HASH, CURRENT_VERSION_IS_NEWER,
                       INVALID_IMAGE_TOO_LARGE, _BYTES)


def refused(r):
    """The image group's error for a Refused operation (device/imgerr.py: the
    table is loaded only when something is refused)."""
    import imgerr

    return imgerr.refused(r)


def check_version(hdr, running, cfg):
    """Refused for an image older than the running (confirmed) one, unless the
    configuration allows downgrades (the policy's first-chunk rule)."""
    if running is not None and not cfg.get("allow_downgrade", False):
        if image.version_key(hdr.version) < image.version_key(running.version):
            raise Refused("downgrade")


def admit_slots(g, target, hdr, req):
    """The A/B slots' admission of a first chunk: a free slot, and a version the
    policy allows (and newer than the running one when `upgrade` asks it)."""
    up = g.up
    if up.slot_in_use(target) or up.st.pending == target:
        raise GroupError(NO_FREE_SLOT)
    running = up.running()
    if arg(req, "upgrade", bool, False) and running is not None:
        if image.version_key(hdr.version) <= image.version_key(running.version):
            raise GroupError(CURRENT_VERSION_IS_NEWER)
    try:
        check_version(hdr, running, up.cfg)
    except Refused as r:
        raise refused(r)


def accept_slots(g, inf):
    """The A/B slots' verdict on a whole image: a bundle, trusted by the policy."""
    if inf.tlvs.get(image.TLV_KIND) is not None:
        raise Refused("wrong-kind")  # a native firmware image is no application bundle
    g.up.check_image(inf, g.up.running())


def first(g, req, data):
    """A chunk at offset 0: resume the same image or start a session. Returns a
    reply, or None when the chunk is to be written like any other."""
    s = g.session
    table = g.table
    length = arg(req, "len", int)
    sha = arg(req, "sha", _BYTES, b"")
    if len(sha) > 32:
        raise GroupError(INVALID_HASH)
    target = g._target()
    same = (length is not None and len(sha) and s.state != upload.IDLE and s.slot.index == target
            and s.length == length and s.sha == bytes(sha))
    g._claim(same)
    if same:
        # Same image as the unfinished (or finished) session: resume.
        if s.state == upload.DONE and table.info(target) is not None:
            return {"off": s.length, "match": True}
        if s.state == upload.RUNNING:
            if s.need_rehash:
                s.rehash()
            if s.off == s.length:
                return finish(g)  # all data was in flash; only the end was lost
            if s.off > 0:
                return {"off": s.off}
            if s.hdr is None and len(data) >= image.HEADER_SIZE:
                try:
                    s.hdr = image.Header(data)
                except ValueError:
                    raise GroupError(INVALID_IMAGE_HEADER_MAGIC)
            if s.hdr is not None:
                table.busy = target
                return None  # sector 0 still to come; later sectors (a multicast's) are kept
        # Nothing kept yet: start the session again with this first chunk.
    if length is None:
        raise GroupError(INVALID_LENGTH)
    if len(data) < image.HEADER_SIZE:
        raise GroupError(INVALID_IMAGE_HEADER)
    try:
        hdr = image.Header(data)
    except ValueError:
        raise GroupError(INVALID_IMAGE_HEADER_MAGIC)
    slot = table[target]
    if length > slot.size or not slot.fits(length):
        raise GroupError(INVALID_IMAGE_TOO_LARGE)
    if hdr.hdr_size < image.HEADER_SIZE or hdr.hashed_size > length or hdr.flags & (image.F_ENCRYPTED | image.F_RAM_LOAD):
        raise GroupError(INVALID_IMAGE_HEADER)
    adm = getattr(g, "_admit", None)
    if adm is None:
        admit_slots(g, target, hdr, req)
    else:
        adm(target, hdr, req)
    if s.state == upload.RUNNING and s.slot.index != target:
        s.cancel(False)
    table.busy = target
    table.invalidate(target)
    try:
        s.begin(slot, length, sha, hdr)
    except OSError:
        raise GroupError(FLASH_WRITE_FAILED)
    return None


def finish(g):
    """All bytes are in flash: read the image back, verify it like the boot
    stage does, and keep it only when its kind and the policy accept it."""
    s = g.session
    table = g.table
    t = s.slot.index
    digest, match = s.finish()
    table.busy = -1
    table.invalidate(t)
    inf = table.info(t)
    if inf is None or inf.hash != digest:
        s.cancel(True)
        table.invalidate(t)
        raise GroupError(INVALID_HASH)
    if match is False:
        s.cancel(True)
        table.invalidate(t)
        return {"off": s.off, "match": False}
    try:
        acc = getattr(g, "_accept", None)
        if acc is None:
            accept_slots(g, inf)
        else:
            acc(inf)
    except Refused as r:
        # Refused images never stay bootable: the header sector goes.
        s.cancel(True)
        table.invalidate(t)
        raise refused(r)
    s.mark_done()
    if match is None:
        return {"off": s.off}
    return {"off": s.off, "match": True}
