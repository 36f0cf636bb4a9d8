# The lab's speed probe: a fixed interpreter workload (calls, attributes,
# integer and list work, string compares) timed for ~0.3 s. Its rate, against
# the pystone rate measured beside it once (lab/mcu.py CAL_*), tells how fast
# this host runs MicroPython, hence the throttle that gives a board its speed.
import time


class _R:
    def __init__(self, a, b):
        self.a = a
        self.b = b

    def step(self, k):
        self.a = (self.a * 3 + k) & 0xFFFF
        return self.a ^ self.b


def _pass(arr, s1, s2):
    r = _R(7, 11)
    t = 0
    for i in range(50):
        t += r.step(i)
        arr[i & 15] = t & 0xFF
        if s1 < s2:
            t += 1
    return t


def main():
    import sys

    arr = [0] * 16
    s1 = "DHRYSTONE PROGRAM, 1'ST STRING"
    s2 = "DHRYSTONE PROGRAM, 2'ND STRING"
    if len(sys.argv) > 1:
        # A fixed amount of work: the lab times it in CPU seconds (immune to other load).
        for _ in range(int(sys.argv[1])):
            _pass(arr, s1, s2)
        return
    n = 0
    t0 = time.ticks_us()
    while True:
        for _ in range(100):
            _pass(arr, s1, s2)
        n += 100
        dt = time.ticks_diff(time.ticks_us(), t0)
        if dt > 300000:
            break
    print("kernel %.1f" % (n * 1000000 / dt))


main()
