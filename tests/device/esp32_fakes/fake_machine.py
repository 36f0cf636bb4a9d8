# A stand-in for the parts of `machine` the ESP32 board uses (installed as
# sys.modules["machine"] by fwdrv.py): WDT and reset(), recorded in esp32.LOG.
import esp32


class Reset(Exception):
    """machine.reset(): the driver catches it and boots again."""


class WDT:
    def __init__(self, id=0, timeout=5000):
        esp32.log("wdt", timeout)
        self.feeds = 0

    def feed(self):
        self.feeds += 1


def reset():
    esp32.log("reset", esp32.RUNNING_LABEL)
    raise Reset()
