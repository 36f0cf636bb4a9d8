# The simulated board's boot: what its ROM, bootloader and frozen _boot.py do
# before main.py, on the lab's stand-ins.
#   micropython -X heapsize=H labboot.py      (env MTR_HW=hw.json, MICROPYPATH=ports:boards/unix)
# rp2:   littlefs over rp2.Flash() (progsize=256) mounted at /, as _boot.py.
# esp32: the bootloader's OTA choice (esp32.boot), then littlefs over the vfs
#        partition at /, as _boot.py / inisetup.py.
# The heap the stand-ins' own Python takes (C on the boards) is reported as
# "H<bytes>", the heap in use when main.py starts as "M<bytes>" (below).
# Then the host's filesystem is gone: sys.path is the board's ('', '/lib'),
# the stand-ins stay loaded (frozen in the real firmware), and main.py runs
# from the device filesystem as pyexec_file("main.py") would.
import gc

gc.collect()
_h0 = gc.mem_alloc()
import _hw

_hw.note("B")  # the firmware starts: the supervisor charges CPU time to the board from here
import sys
import os
import vfs
import machine
import _nor

p = _hw.params()
board = p["board"]
if board == "rp2":
    import rp2

    _hw.standins_loaded(_h0)
    fs = vfs.VfsLfs2(rp2.Flash(), progsize=256)
elif board == "esp32":
    import esp32

    _hw.standins_loaded(_h0)
    esp32.boot()
    fs = vfs.VfsLfs2(esp32.Partition.find(esp32.Partition.TYPE_DATA, label="vfs")[0])
else:
    raise OSError(22, "unknown lab board " + board)
# Modules the firmware has frozen in, loaded now while the host's files are reachable.
import json, select, io, time, struct, binascii, hashlib, errno, gc, micropython  # noqa

vfs.umount("/")
vfs.mount(fs, "/")
os.chdir("/")
sys.path[:] = ["", "/lib"]
del fs, p, _h0
# What the firmware holds when main.py starts (the stand-ins, the root mount, the frozen
# modules' entries, this boot stage's own state), reported as "M<bytes>": a board's free
# heap at boot (the Pico's 209,936 bytes) is measured after its _boot.py, so figures of
# the device code's heap are given net of it.
gc.collect()
_hw.note("M%d" % gc.mem_alloc())
_g = {"__name__": "__main__"}
with open("main.py") as _f:
    _src = _f.read()
# pyexec_file keeps neither the file (littlefs gives an open file a 1 KiB cache, which
# stays with the object) nor the source once main.py is compiled: nor does the lab.
_code = compile(_src, "main.py", "exec")
del _f, _src
gc.collect()
exec(_code, _g)
