# The device's update logic, shared by the boot stage and the SMP image group:
# which slot boots, test / confirm / revert, and the outcome that becomes the
# confirmation record. Direct A/B (MCUboot's direct-XIP-with-revert model): the
# image runs from the slot it was written to; nothing is ever copied.
import sys
import time
import slots
import bootstate
import upload
import image
from bootstate import NONE, RES_OK, RES_KO


class Refused(Exception):
    """An operation the state or the policy does not allow; .why names it for SMP."""

    def __init__(self, why):
        self.why = why

META_STATE = 0  # sectors 0 and 1 of the meta partition
META_SESSION = 2  # sector 2


class Updater:
    def __init__(self, board):
        self.board = board
        self.cfg = board.config
        self.trusted = []  # image hashes whose signature verified in this run (policy.py)
        self.slots = slots.SlotTable(board.slot_a, board.slot_b)
        self.st = bootstate.BootState(board.meta, META_STATE)
        self.st.load()
        self.session = upload.Session(board.meta, META_SESSION)
        self.session.load(self.slots)
        if self.session.state == upload.RUNNING:
            self.slots.busy = self.session.slot.index

    # -- helpers ------------------------------------------------------------
    @property
    def active(self):
        return self.st.active

    @property
    def other(self):
        return 1 - self.st.active if self.st.active != NONE else slots.A

    def _ver(self, i):
        inf = self.slots.info(i) if i != NONE else None
        return image.pack_version(inf.version) if inf else bytes(8)

    def _record(self, result, reason, slot, prev_slot):
        inf = self.slots.info(slot) if slot != NONE else None
        self.st.record(result, reason, inf.hash if inf else bytes(32), self._ver(slot),
                       self._ver(prev_slot), int(time.time()))

    def _bootable(self, i):
        inf = self.slots.info(i)
        return inf is not None and inf.bootable

    def running(self):
        """Info of the confirmed running image (None during a trial or with none)."""
        if self.st.active == NONE or self.st.trial:
            return None
        return self.slots.info(self.st.active)

    def trust(self, i):
        """Raise Refused unless slot i may boot under the policy."""
        self.check_image(self.slots.info(i), self.running())

    def check_image(self, info, running):
        """Once the whole image is in flash, and before it may boot: Refused
        unless its signature and security counter pass (device/policy.py, loaded
        for the check and released after: it comes once or twice per image; the
        first chunk's version rule is imgcheck.check_version)."""
        had = "policy" in sys.modules
        try:
            import policy

            return policy.check_image(self.cfg, self.trusted, info, running)
        finally:
            if not had:
                sys.modules.pop("policy", None)

    # -- boot ---------------------------------------------------------------
    def select_boot(self):
        """Decide which slot boots now and persist that decision before it runs.

        Returns the slot index, or -1 when no slot holds a bootable image. Its
        code (device/bootsel.py) is the boot stage's: the receiver never runs
        it, so the receiver's copy of this module does not carry it."""
        import bootsel

        return bootsel.select_boot(self)

    # -- test / confirm / revert ------------------------------------------
    def revert(self, reason):
        """Leave the test image for the fallback; records KO (caller saves)."""
        st = self.st
        t = st.active
        o = 1 - t
        self._record(RES_KO, reason, t, o)
        st.active = o
        st.trial = False

    def fail_trial(self, reason):
        """The test image failed while running (exception, self-test): revert now."""
        if self.st.trial:
            self.revert(reason)
            self.st.save()
            return True
        return False

    def confirm(self, reason="confirmed"):
        st = self.st
        if st.trial:
            st.trial = False
            self._record(RES_OK, reason, st.active, 1 - st.active)
            st.save()

    def slot_in_use(self, i):
        """True when slot i must not be overwritten: it runs, or it is the fallback."""
        return i == self.st.active or (self.st.trial and i == 1 - self.st.active)

def app_selftest(app):
    """Run the application's selftest(), if it has one; None when it passed,
    else why it failed (a trial boot's verdict on a self-confirming device)."""
    check = getattr(app, "selftest", None)
    try:
        if check is None or check():
            return None
        return "self-test returned False"
    except Exception as e:
        return "self-test raised %r" % (e,)
