# The image group's state read/write (test, confirm) and erase, over the image
# kinds an ImageGroup serves (grp_image.ImageGroup and the groups of add_image).
# A host sends these a few times per upgrade, so this code is loaded for each
# request and released after (smp.call_lazy); the upload path stays resident.
import image
import upload
from bootstate import NONE
from grp_image import GroupError, HASH_NOT_FOUND, INVALID_HASH, INVALID_SLOT, _BYTES
from smp import arg
from updater import Refused


def refused(r):
    import imgerr  # an error path: its table is not loaded for every state request

    return imgerr.refused(r)


def state_map(top):
    images = top.state_images()
    if top.others:
        for e in images:
            e["image"] = 0  # several images: each entry says which
        for _n, g in top.others:
            images += g.state_images()
    return {"images": images, "splitStatus": 0}


def read(top, req):
    return state_map(top)


def write(top, req):
    h = arg(req, "hash", _BYTES)
    confirm = arg(req, "confirm", bool, False)
    groups = top._groups()
    try:
        if h is None or not len(h):  # an empty hash is no hash, as in Zephyr
            if not confirm:
                raise GroupError(INVALID_HASH)
            for g in groups:
                g.confirm_running()
        else:
            if len(h) != 32:
                raise GroupError(INVALID_HASH)
            h = bytes(h)
            for g in groups:
                i = g.find_hash(h)
                if i >= 0:
                    if any(o is not g and o.on_trial() for o in groups):
                        raise Refused("pending")  # one trial at a time, whatever the image kind
                    g.test(i, confirm)
                    break
            else:
                raise GroupError(HASH_NOT_FOUND)
    except Refused as r:
        raise refused(r)
    return state_map(top)


def erase(top, req):
    logical = arg(req, "slot", int, 1)
    # Slots 0/1 are image 0's; 2/3 image 1's (Zephyr's numbering across images).
    g = top if logical in (0, 1) else (top.others[0][1] if top.others and logical in (2, 3) else None)
    if g is None:
        raise GroupError(INVALID_SLOT)
    g._claim(False)
    try:
        g.erase_slot(logical & 1)
    except Refused as r:
        raise refused(r)
    return {}


# The A/B slots' side of these requests (grp_image.ImageGroup's; another image
# kind has its own).
def slots_test(up, slot, permanent):
    """State write `hash` of an A/B slot: test it at the next boot (or confirm the running one)."""
    st = up.st
    if slot == st.active:
        if permanent:
            up.confirm()
            return
        raise Refused("test-active")
    if st.trial:
        raise Refused("pending")  # the other slot is the fallback
    if not up._bootable(slot):
        raise Refused("not-bootable")
    up.trust(slot)
    st.pending = slot
    st.permanent = permanent
    st.save()


def slots_erase(up, i):
    """Erase A/B slot i, unless it runs or is the fallback."""
    if up.slot_in_use(i):
        raise Refused("in-use")
    if up.session.state != upload.IDLE and up.session.slot.index == i:
        up.session.cancel(False)
    if up.st.pending == i:
        up.st.pending = NONE
        up.st.permanent = False
        up.st.save()
    up.slots[i].erase(0)
    up.slots.busy = -1
    up.slots.invalidate(i)


def slots_images(up):
    """The SMP state-read list: slot 0 is the running image, slot 1 the other."""
    st = up.st
    out = []
    for logical, i in ((0, st.active), (1, up.other)):
        if i == NONE:
            continue
        inf = up.slots.info(i)
        if inf is None:
            continue
        e = {"slot": logical, "version": image.version_str(inf.version), "hash": inf.hash}
        if inf.bootable:
            e["bootable"] = True
        if logical == 0:
            e["active"] = True
            if not st.trial:
                e["confirmed"] = True
        else:
            if st.pending == i:
                e["pending"] = True
                if st.permanent:
                    e["permanent"] = True
            if st.trial:
                e["confirmed"] = True
        out.append(e)
    return out
