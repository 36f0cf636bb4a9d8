# The boot stage: small, fixed, outside the slots. It reads the boot state,
# picks the slot (test once, revert, fall back), mounts that slot's application
# bundle (a littlefs image inside the MCUboot image) read-only at /app and runs
# the receiver from it. If the trial image fails at import or while running, it
# records why and resets into the previous image. With no bootable slot it runs
# the recovery receiver from the device filesystem, so a device never bricks.
import sys

# MicroPython keeps an extensible built-in (io, time, struct, hashlib...) out of sys.modules
# and looks for it on sys.path at every import statement that names one: with /app first
# there, on a Pico in files mode, three littlefs lookups through the slot's sector files and a
# 1.2 KB open-file allocation each. Registered once here, they are found at once.
for _n in ("array", "binascii", "errno", "hashlib", "io", "json", "machine", "os", "select",
           "socket", "struct", "time"):
    if _n not in sys.modules:
        try:
            sys.modules[_n] = __import__(_n)
        except ImportError:
            pass  # not in this firmware (socket without networking)
del _n

_KEEP = set(sys.modules)  # the board's modules stay; ours are reloaded from /app

import gc
import vfs

APP_MOUNT = "/app"
# A collection after every 4 KiB allocated: short-lived objects (import temporaries,
# requests) are reclaimed before long-lived ones land among them, so the heap stays
# in one piece; without it a deflate upload needed 56wK instead of 48wK (tools/bench.py).
GC_EVERY = 4096
BUNDLE_BLOCK = 512  # littlefs block size of application bundles (host: meterota.image)


class BundleDevice:
    """Read-only block device over the payload of the image in a slot."""

    def __init__(self, slot, start, size):
        self.slot = slot
        self.start = start
        self.count = size // BUNDLE_BLOCK

    def readblocks(self, n, buf, off=0):
        self.slot.readinto(self.start + n * BUNDLE_BLOCK + off, buf)

    def writeblocks(self, n, buf, off=0):
        raise OSError(30)  # EROFS

    def ioctl(self, op, arg):
        if op == 4:
            return self.count
        if op == 5:
            return BUNDLE_BLOCK
        return 0


def mount(up, i):
    inf = up.slots.info(i)
    dev = BundleDevice(up.slots[i], inf.hdr.hdr_size, inf.hdr.img_size)
    try:
        vfs.umount(APP_MOUNT)
    except OSError:
        pass
    vfs.mount(vfs.VfsLfs2(dev, readsize=64, progsize=64, lookahead=32), APP_MOUNT, readonly=True)


def _forget_modules():
    for name in list(sys.modules):
        if name not in _KEEP and name != "mtboot":
            del sys.modules[name]


def _short(e):
    return "%s: %s" % (type(e).__name__, e)


def start(board):
    # The boot stage's modules are imported here, not at module level: once the
    # slot is chosen they are dropped (the receiver loads its own from /app), and
    # a global reference would keep a second copy of their code in RAM. Nothing
    # of the boot stage (its Updater and its buffers, an exception and the frames
    # it holds) is kept while a receiver runs.
    gc.threshold(GC_EVERY)
    import updater
    import image

    up = updater.Updater(board)
    i = up.select_boot()
    if i < 0:
        print("meterota: no bootable image, running the recovery receiver")
        del up, updater, image
        return recovery(board)
    why = None
    try:
        mount(up, i)
    except OSError as e:
        why = str(e)
    if why is not None:
        # The slot verified but its bundle does not mount: a bad image.
        if up.fail_trial("bundle does not mount: " + why):
            board.reset()
        print("meterota: bundle in slot", "AB"[i], "does not mount:", why)
        del up, updater, image
        return recovery(board)
    print("meterota: booting slot", "AB"[i], image.version_full(up.slots.info(i).version),
          "(trial)" if up.st.trial else "")
    del up, updater, image
    _forget_modules()
    gc.collect()
    sys.path.insert(0, APP_MOUNT)
    try:
        import receiver

        receiver.main(board)
    except Exception as e:  # noqa: the app may fail in any way; SystemExit passes
        sys.print_exception(e)
        why = "app: " + _short(e)
    if why is None:
        return  # the receiver returned: nothing failed
    sys.path.remove(APP_MOUNT)
    _forget_modules()
    import updater

    up = updater.Updater(board)
    if up.fail_trial(why):
        board.reset()
    del up, updater
    # A confirmed image that crashes keeps the device reachable.
    print("meterota: application failed, running the recovery receiver")
    return recovery(board)


def run(board):
    """Entry point of a real board's main.py. For the first `grace_ms` (config,
    default 3000) Ctrl-C still reaches the REPL, so mpremote/deploy can take the
    board back after a reset: once the receiver runs on the console, Ctrl-C is
    data (micropython.kbd_intr(-1))."""
    import time

    grace = int(board.config.get("grace_ms", 3000))
    if grace:
        print("meterota: starting in %d ms (Ctrl-C for the REPL)" % grace)
        time.sleep_ms(grace)
    start(board)


def recovery(board):
    sys.path = [p for p in sys.path if p != APP_MOUNT]
    import receiver

    receiver.main(board, recovery=True)
