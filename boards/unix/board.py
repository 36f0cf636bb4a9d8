# The unix board: the simulator's hardware. Flash is a file-backed NOR model,
# the serial port is a TCP connection to the simulator's pty bridge, Wi-Fi is
# a UDP socket on a loopback address, and reset is an exit the simulator
# turns into a restart with the same flash.
import json
import socket
import sys
import time
import norflash

EXIT_RESET = 3


class Board:
    name = "unix"

    def __init__(self, state_dir):
        self.t0 = time.ticks_ms()  # the start of this boot as the device code sees it (receiver: ready_ms)
        self.state_dir = state_dir
        with open(state_dir + "/config.json") as f:
            self.config = json.load(f)
        # The flash map comes from boards/unix/layout.json via config.json.
        lay = self.config["layout"]
        self.flash = norflash.NorFlash(state_dir + "/flash.bin", lay["flash_size"])
        self.meta = norflash.Partition(self.flash, *lay["meta"])
        self.slot_a = norflash.Partition(self.flash, *lay["slot_a"])
        self.slot_b = norflash.Partition(self.flash, *lay["slot_b"])
        # A concentrator's meter-image store and job log.
        self.store = norflash.Partition(self.flash, *lay["store"]) if "store" in lay else None
        self.jobs = norflash.Partition(self.flash, *lay["jobs"]) if "jobs" in lay else None

    def links(self, frame_max):
        import link

        # A second call (the recovery receiver after a failed application)
        # takes the ports over: close what the first one opened.
        for s in getattr(self, "_socks", ()):
            s.close()
        self._socks = []
        out = []
        ser = self.config.get("serial")
        if ser:
            host, port = ser.split(":")[1:]
            s = socket.socket()
            s.connect(socket.getaddrinfo(host, int(port))[0][-1])
            s.setblocking(False)
            self._socks.append(s)
            out.append(link.StreamLink(s, frame_max))
        udp = self.config.get("udp")
        if udp:
            host, port = udp.split(":")
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind(socket.getaddrinfo(host, int(port))[0][-1])
            u.setblocking(False)
            self._socks.append(u)
            out.append(link.DatagramLink(u, frame_max))
        return out

    def ready(self, ctx):
        if self.config.get("fail_trial") and ctx.up.st.trial:
            # The simulator's stand-in for hardware that fails on a new image.
            raise RuntimeError("simulated hardware fault on trial boot")
        print("meterota: ready", ctx.device_id, "(recovery)" if ctx.recovery else "")

    def reset(self):
        print("meterota: reset")
        sys.exit(EXIT_RESET)

    def stats(self):
        return self.flash.stats()
