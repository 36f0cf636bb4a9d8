# The boot decision (MCUboot's direct-XIP-with-revert, as device/updater.py
# describes): which slot boots now, test once, revert, fall back. Only the boot
# stage runs it (updater.Updater.select_boot), so it is its own module: the
# receiver's copy of updater.py does not carry it in the heap.
import slots
from bootstate import NONE, RES_OK, RES_KO
from updater import Refused


def select_boot(up):
    """Decide which slot boots now and persist that decision before it runs.

    Returns the slot index, or -1 when no slot holds a bootable image."""
    st = up.st
    st.boots += 1
    if not st.valid:
        st.active = NONE
        st.pending = NONE
        st.flags = 0
    failed = NONE  # a test image that just failed: never fall back onto it
    if st.trial:
        # The test image got a reset before anyone confirmed it.
        failed = st.active
        up.revert("not confirmed before reset")
    elif st.pending != NONE:
        p = st.pending
        st.pending = NONE
        why = "pending image invalid"
        if p != st.active and up._bootable(p):
            try:
                up.trust(p)  # the boot stage checks like MCUboot would
            except Refused as r:
                why = "pending image refused: " + r.why
                p = NONE
        if p != NONE and p != st.active and up._bootable(p):
            prev = st.active
            st.active = p
            if st.permanent:
                up._record(RES_OK, "made permanent", p, prev)
            else:
                st.trial = True
        else:
            up._record(RES_KO, why, st.pending if p == NONE else p, st.active)
        st.permanent = False
    if st.active != NONE and not up._bootable(st.active):
        if st.trial:
            failed = st.active
            up.revert("test image invalid")
        else:
            st.revert_reason = "active image invalid"
            failed = st.active
            st.active = NONE
    if st.active == NONE or not up._bootable(st.active):
        st.active = NONE
        for i in (slots.A, slots.B):
            if i != failed and up._bootable(i):
                st.active = i
                break
    st.save()
    return -1 if st.active == NONE else st.active
