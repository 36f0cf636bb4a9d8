# A tiny meter application for the demo: the runtime imports it at boot, runs
# its self-test on a trial boot (when the device confirms itself) and calls
# poll() between SMP requests.
import time

VERSION_NOTE = "demo meter app"
_last = 0


def selftest():
    # A real meter would check its metrology chip and display here.
    return True


def poll():
    global _last
    now = time.time()
    if now - _last >= 60:
        _last = now
        print("meter: %s, energy register ok" % VERSION_NOTE)
