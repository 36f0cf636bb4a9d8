# The lab board's hardware core, shared by the port stand-ins (rp2, esp32,
# machine). MicroPython code: it runs inside the simulated board.
#
# - params(): the board's facts from the supervisor's hw.json (env MTR_HW):
#   flash file and geometry, erase/program times, watchdog limits, links.
# - stall(us): time with interrupts off (an erase or program of the XIP flash
#   on RP2040, the cache-disabled flash write on ESP32). Nothing else runs:
#   the process sleeps, no link is serviced, and peripherals that register an
#   irq hook (the UART's 32-byte FIFO) see the interrupts come back only after.
# - note(): the side channel to the supervisor on fd 2 (stderr), one line per
#   event: "W<ms>" watchdog armed, "F" fed (rate-limited), never payload.
# - standins_loaded(): "H<bytes>", the heap the stand-ins' modules took at boot
#   (their bytecode and state: C in the boards' firmware, costing no heap there).
import json
import os
import sys
import time

_params = None
_hooks = []


def params():
    global _params
    if _params is None:
        path = os.getenv("MTR_HW")
        if not path:
            raise OSError(19, "MTR_HW not set: not running under the lab supervisor")
        with open(path) as f:
            _params = json.load(f)
    return _params


def irq_hook(obj):
    """obj.irq_off() / obj.irq_on() run around every stall."""
    _hooks.append(obj)


def stall(us):
    if us <= 0:
        return
    for h in _hooks:
        h.irq_off()
    time.sleep_us(us)
    for h in _hooks:
        h.irq_on()


def standins_loaded(before):
    import gc

    gc.collect()
    note("H%d" % (gc.mem_alloc() - before))


def note(line):
    try:
        sys.stderr.write(line + "\n")
    except OSError:
        pass
