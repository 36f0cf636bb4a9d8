# Stand-in for boards/unix/main.py that honours the simulator contract (MicroPython).
#
# Reads <DIR>/config.json, connects to the supervisor's TCP port ("serial") or binds its UDP
# address, prints "meterota: ready", then echoes every byte back. A line (or datagram) equal to
# RESET / PF / CRASH / STOP makes it exit with 3 / 86 / an uncaught exception / 0, after echoing.
# Test-only config keys: boot_delay_ms (sleep before serving, every boot), crash_on_boot.
import json
import os
import socket
import sys
import time

state_dir = sys.argv[1]
with open(state_dir + "/config.json") as f:
    cfg = json.load(f)

print("echo: id=%s powerfail=%s" % (cfg["id"], os.getenv("MTR_POWERFAIL")))
if cfg.get("crash_on_boot"):
    raise RuntimeError("crash_on_boot")
if cfg.get("boot_delay_ms"):
    time.sleep_ms(cfg["boot_delay_ms"])


def command(line):
    if line == b"RESET":
        sys.exit(3)
    if line == b"PF":
        sys.exit(86)
    if line == b"STOP":
        sys.exit(0)
    if line == b"CRASH":
        raise RuntimeError("CRASH requested")


def serve_stream(s):
    pending = b""
    while True:
        data = s.recv(4096)
        if not data:
            sys.exit(0)
        s.write(data)
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            command(line)
        # Commands are short lines; don't let a long line without newline grow forever.
        pending = pending[-16:]


def serve_udp(s):
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(data, addr)
        command(data.rstrip(b"\n"))


if cfg["serial"]:
    _, host, port = cfg["serial"].split(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(socket.getaddrinfo(host, int(port))[0][-1])
    print("meterota: ready")
    serve_stream(s)
else:
    host, port = cfg["udp"].split(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(socket.getaddrinfo(host, int(port))[0][-1])
    print("meterota: ready")
    serve_udp(s)
