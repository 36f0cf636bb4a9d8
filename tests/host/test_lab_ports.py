"""The lab's port stand-ins (host/meterota/lab/ports): their signatures against the official
MicroPython stubs of each port, and, under the unix MicroPython, that they refuse what the real
modules refuse and take the chip's time."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PORTS = REPO / "host" / "meterota" / "lab" / "ports"
STUBS_DIR = Path(os.environ.get("MTR_STUBS_DIR", REPO / ".venv" / "mpstubs"))
MICROPYTHON = Path(sys.executable).parent / "micropython"

# stand-in module -> the stub files it must match (one per port that has the module)
STUBBED = {
    "rp2": [STUBS_DIR / "rp2" / "rp2" / "__init__.pyi"],
    "esp32": [STUBS_DIR / "esp32" / "esp32.pyi"],
    "machine": [STUBS_DIR / "rp2" / "machine.pyi", STUBS_DIR / "esp32" / "machine.pyi"],
}
# Public names of a stand-in that no stub has: the lab's own hooks, documented in the module.
LAB_ONLY = {
    "esp32": {"boot"},  # the bootloader's OTA choice, called by the lab boot
    "machine": {"EXIT_RESET", "UART.irq_off", "UART.irq_on", "UART.overruns", "UART.baudrate", "UART.ioctl",
                "Pin.IN", "Pin.OUT", "Pin.OPEN_DRAIN", "Pin.ALT", "Pin.PULL_UP", "Pin.PULL_DOWN", "Pin.id"},
}


@dataclass
class Sig:
    pos: list[str]  # positional parameters (after self)
    pos_required: int
    posonly: int
    kwonly: dict[str, bool]  # name -> required
    varargs: bool
    varkw: bool
    defaults: dict[str, object]


def _const(node: ast.expr | None) -> object:
    try:
        return ast.literal_eval(node) if node is not None else None
    except ValueError:
        return ...


def sig_of(fn: ast.FunctionDef, method: bool) -> Sig:
    a = fn.args
    posonly = [p.arg for p in a.posonlyargs]
    pos = posonly + [p.arg for p in a.args]
    defaults = {name: _const(d) for name, d in zip(pos[len(pos) - len(a.defaults):], a.defaults)}
    skip = 1 if method and pos and pos[0] in ("self", "cls") else 0
    kwonly = {}
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        kwonly[p.arg] = d is None
        if d is not None:
            defaults[p.arg] = _const(d)
    return Sig(pos[skip:], len(pos) - len(a.defaults) - skip, max(0, len(posonly) - skip), kwonly,
               a.vararg is not None, a.kwarg is not None, defaults)


def members(path: Path) -> dict[str, list[Sig] | None]:
    """Top-level functions, classes' methods and attributes: name -> signatures (all overloads),
    or None for a constant/attribute."""
    tree = ast.parse(path.read_text())
    out: dict[str, list[Sig] | None] = {}

    def walk(body: list[ast.stmt], prefix: str, method: bool) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef):
                name = prefix + node.name
                if node.name.startswith("_") and node.name != "__init__":
                    continue
                cur = out.get(name) or []
                out[name] = cur + [sig_of(node, method)]
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                out[prefix + node.name] = out.get(prefix + node.name) or []
                walk(node.body, prefix + node.name + ".", True)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and not t.id.startswith("_"):
                        out.setdefault(prefix + t.id, None)
    walk(tree.body, "", False)
    return out


def accepts(ours: Sig, stub: Sig) -> list[str]:
    """What a call that the stub allows would do to our function, as problems."""
    bad = []
    n_stub_pos = len(stub.pos)
    if not ours.varargs and len(ours.pos) < n_stub_pos:
        bad.append(f"takes {len(ours.pos)} positional arguments, the port {n_stub_pos}")
    if ours.pos_required > stub.pos_required:
        bad.append(f"requires {ours.pos_required} positional arguments, the port {stub.pos_required}")
    for i, name in enumerate(stub.pos[stub.posonly:], stub.posonly):
        # Passable by keyword on the port: must be the same name here.
        if i < len(ours.pos) and ours.pos[i] != name and not ours.varkw:
            bad.append(f"positional parameter {i} is {ours.pos[i]!r}, the port's {name!r}")
    for name in stub.kwonly:
        if name not in ours.kwonly and name not in ours.pos and not ours.varkw:
            bad.append(f"no keyword {name!r}")
    for name, req in ours.kwonly.items():
        if req and not stub.kwonly.get(name):
            bad.append(f"requires keyword {name!r}")
    for name, d in stub.defaults.items():
        if name in ours.defaults and d is not ... and d is not None and ours.defaults[name] not in (d, None):
            bad.append(f"default {name}={ours.defaults[name]!r}, the port's {d!r}")
    return bad


def test_stubs_present() -> None:
    for files in STUBBED.values():
        for f in files:
            assert f.exists(), f"{f} missing: run `make venv` (tools/install_stubs.sh)"


@pytest.mark.parametrize("module", sorted(STUBBED))
def test_stand_in_matches_the_ports_stubs(module: str) -> None:
    ours = members(PORTS / f"{module}.py")
    problems = []
    for stub_file in STUBBED[module]:
        stub = members(stub_file)
        for name, sigs in ours.items():
            if name in LAB_ONLY.get(module, set()) or name.split(".")[0] in LAB_ONLY.get(module, set()):
                continue
            if name not in stub:
                # machine: each port lacks some of the other's names; it must be in one of them.
                if not any(name in members(f) for f in STUBBED[module]):
                    problems.append(f"{module}.{name}: not in the port's API")
                continue
            if sigs is None or stub[name] is None or not sigs or not stub[name]:
                continue
            for overload in stub[name] or []:
                for s in sigs:
                    bad = accepts(s, overload)
                    if bad:
                        problems.append(f"{stub_file.parent.name}: {module}.{name}: " + "; ".join(bad))
    assert not problems, "\n".join(problems)


def test_signature_check_catches_a_mismatch() -> None:
    stub = members(STUBBED["rp2"][0])["Flash.__init__"]
    assert stub is not None
    wrong = sig_of(ast.parse("def __init__(self, start=-1, length=-1): pass").body[0], True)  # type: ignore[arg-type]
    assert any("no keyword 'len'" in b for ov in stub for b in accepts(wrong, ov))
    wdt = members(STUBBED["machine"][0])["WDT.__init__"]
    assert wdt is not None
    bad_default = sig_of(ast.parse("def __init__(self, *, id=0, timeout=8000): pass").body[0], True)  # type: ignore[arg-type]
    assert any("default timeout" in b for ov in wdt for b in accepts(bad_default, ov))


# -- behaviour under the unix MicroPython ------------------------------------------------------

def run_lab_proc(tmp_path: Path, board: str, code: str) -> subprocess.CompletedProcess[str]:
    """`code` under the unix MicroPython with the board's stand-ins and a fresh flash; it must
    exit 0. The stand-ins' side-channel notes are its stderr."""
    sys.path.insert(0, str(REPO / "host"))
    from meterota.lab import mcu

    cfg = {"id": "t", "variant": "pico"}
    hw = mcu.hw_params(board, tmp_path, cfg)
    (tmp_path / "flash.bin").write_bytes(b"\xff" * hw["flash_size"])
    (tmp_path / "hw.json").write_text(json.dumps(hw))
    script = tmp_path / "t.py"
    script.write_text(code)
    env = dict(os.environ, **mcu.lab_env(board, tmp_path))
    p = subprocess.run([str(MICROPYTHON), str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def run_lab(tmp_path: Path, board: str, code: str) -> str:
    return run_lab_proc(tmp_path, board, code).stdout


REFUSE = """
def refused(exc, f, *a, **k):
    try:
        f(*a, **k)
    except exc as e:
        return e
    raise SystemExit("accepted: %r %r" % (a, k))
"""


def test_rp2_flash_refuses_and_takes_time(tmp_path: Path) -> None:
    out = run_lab(tmp_path, "rp2", REFUSE + """
import rp2, time
f = rp2.Flash()
assert f.ioctl(4, 0) == 1408 * 1024 // 4096 and f.ioctl(5, 0) == 4096
refused(ValueError, rp2.Flash, start=100, len=4096)
refused(ValueError, rp2.Flash, start=0, len=4096 * 1000)
refused(ValueError, rp2.Flash, start=0, len=100)
w = rp2.Flash(start=8192, len=8192)
assert w.ioctl(4, 0) == 2
refused(OSError, w.readblocks, 2, bytearray(16))           # past the window
refused(OSError, w.writeblocks, 0, bytearray(100))         # erase of a partial sector
refused(OSError, w.writeblocks, 0, bytearray(256), 10)     # program not page aligned
t = time.ticks_ms()
w.ioctl(6, 0)
dt = time.ticks_diff(time.ticks_ms(), t)
assert dt >= 44, dt                                        # W25Q16 sector erase
w.writeblocks(0, b"\\x0f" * 256, 0)
e = refused(OSError, w.writeblocks, 0, b"\\xf0" * 256, 0)  # a 0 bit cannot become 1
assert e.errno == 5, e
b = bytearray(4)
f.readblocks(2, b)                                         # the window is a view of the region
assert b == b"\\x0f" * 4, b
import machine
refused(ValueError, machine.WDT, timeout=8389)             # RP2040's ceiling
refused(ValueError, machine.WDT, id=1, timeout=1000)
machine.WDT(timeout=8388)
assert machine.reset_cause() == machine.PWRON_RESET
print("ok")
""")
    assert out.strip().endswith("ok")


def test_the_flash_chip_tells_its_calls_and_the_throttle_refunds_them(tmp_path: Path) -> None:
    """rp2.Flash and esp32.Partition are C on the boards; here their bytecode would be charged as
    the board's CPU (littlefs reads a directory in thousands of 32-byte reads; a Pico's boot to
    ready, side by side, 65 s without the refund, 51 s with it). The chip reports its reads and programs on
    the side channel, and the throttle takes their measured cost off the charge, also when the note
    comes before the charge it is for."""
    from meterota.lab import mcu

    p = run_lab_proc(tmp_path, "rp2", """
import rp2
f = rp2.Flash()
b = bytearray(32)
for i in range(100):
    f.readblocks(i, b, 64)
for i in range(40):
    f.writeblocks(i, b"\\xff" * 256, 0)
""")
    # every 64 calls: 64 reads, then 36 reads and 28 programs; 12 programs still untold
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("C")] == ["C64,0", "C36,28"], p.stderr
    read, program = mcu.standin_costs(str(MICROPYTHON))
    assert 0 < read < program < 1e-3, (read, program)

    settle = mcu.Throttle.settle
    cap = 0.0005
    # charged first (the device went into debt and was stopped), refunded after: debt paid
    credit, pre = settle(cap, 0.0, 0.002, 0.0, cap)
    assert credit < 0 and pre == 0
    credit, pre = settle(credit, pre, 0.0, 0.002, cap)
    assert abs(credit - cap) < 1e-12 and pre == 0
    # refunded first: the part past the cap waits for its charge instead of being lost
    credit, pre = settle(cap, 0.0, 0.0, 0.002, cap)
    assert credit == cap and abs(pre - 0.002) < 1e-12
    credit, pre = settle(credit, pre, 0.002, 0.0, cap)
    assert abs(credit - cap) < 1e-12 and pre == 0


def test_watchdog_feeds_reach_the_supervisor_within_a_sixteenth_of_the_timeout(tmp_path: Path) -> None:
    """The supervisor resets the board when no feed was noted within the timeout. Notes are
    rate-limited, so an untold feed makes the lab stricter than the chip by the note spacing; a
    quarter of the timeout (2 s of RP2040's 8 s) reset a Pico fed 1.9 s after its last note and
    then busy 6.5 s. Feeds 110 ms apart under a 1.6 s watchdog are each told now."""
    p = run_lab_proc(tmp_path, "rp2", """
import machine, time
w = machine.WDT(timeout=1600)
for _ in range(3):
    time.sleep_ms(110)  # the board's time between feeds (this is the input, not a wait for anything)
    w.feed()
""")
    assert p.stderr.split() == ["W1600", "F", "F", "F"], p.stderr


def test_esp32_partition_refuses_and_rolls_back(tmp_path: Path) -> None:
    out = run_lab(tmp_path, "esp32", REFUSE + """
import esp32, time
P = esp32.Partition
e = refused(OSError, P, "nope")
assert e.errno == 2
a = P.find(P.TYPE_DATA, label="mtr_a")[0]
assert a.info()[4] == "mtr_a" and a.info()[0] == P.TYPE_DATA
assert a.ioctl(4, 0) == a.info()[3] // 4096
e = refused(OSError, a.writeblocks, 0, bytearray(100))      # simple write: whole sectors
assert e.errno == -260, e
e = refused(OSError, a.readblocks, a.ioctl(4, 0), bytearray(1))
assert e.errno == -260, e
assert P("mtr_a", 512).ioctl(6, 0) == -22                   # erase needs block_size 4096
t = time.ticks_ms()
a.ioctl(6, 0)
assert time.ticks_diff(time.ticks_ms(), t) >= 44
a.writeblocks(0, b"\\x01\\x02", 7)                          # byte-granular program
b = bytearray(3)
a.readblocks(0, b, 6)
assert b == b"\\xff\\x01\\x02", b
# OTA: set_boot validates the image; a new image that is not marked valid rolls back.
assert esp32.boot() == "ota_0"
run = P(P.RUNNING)
nxt = run.get_next_update()
assert nxt.info()[4] == "ota_1"
e = refused(OSError, nxt.set_boot)
assert e.errno == -5379, e
hdr = bytearray(b"\\xff" * 4096)
hdr[0] = 0xE9; hdr[1] = 1
hdr[32:36] = bytes((0x32, 0x54, 0xCD, 0xAB))
nxt.writeblocks(0, hdr)
nxt.set_boot()
assert esp32.boot() == "ota_1"        # first boot of the new image: pending verify
assert esp32.boot() == "ota_0"        # reset before mark_app_valid: the bootloader rolls back
nxt.set_boot()
assert esp32.boot() == "ota_1"
P.mark_app_valid_cancel_rollback()
assert esp32.boot() == "ota_1"        # valid now: it stays
import machine
refused(ValueError, machine.WDT, timeout=0)
machine.WDT(timeout=30000)            # no 8.3 s ceiling on ESP32
print("ok")
""")
    assert out.strip().endswith("ok")


def test_uart_link_takes_every_frame_its_ring_holds(tmp_path: Path) -> None:
    """The board's StreamLink over the UART stand-in: three requests that arrived together (more
    than the link's 512-byte read buffer, less than the ring) are all handled in one service, and
    nothing is left in the ring. The receiver polls the UART, which on the lab board watches only
    the line: before, one service took one buffer, the rest waited in the ring for the next byte on
    the line, and a host waiting for its reply sends none (the throttled UART upload stalled)."""
    import binascii
    import socket

    sys.path.insert(0, str(REPO / "host"))
    from meterota.lab import mcu

    hw = mcu.hw_params("esp32", tmp_path, {"id": "t"})
    (tmp_path / "flash.bin").write_bytes(b"\xff" * 4096)
    (tmp_path / "hw.json").write_text(json.dumps(hw))

    def frame(seq: int, n: int) -> bytes:
        smp = bytes((2, 0, n >> 8, n & 0xFF, 0, 0, seq, 0)) + bytes(n)
        ln = len(smp)
        crc = binascii.crc_hqx(smp, 0)
        return bytes((6, 0x0B, ln >> 8, ln & 0xFF, ~((ln >> 8) + (ln & 0xFF)) & 0xFF)) + smp + crc.to_bytes(2, "big")

    wire = b"".join(frame(s, 400) for s in range(3))
    assert 512 < len(wire) < 4096
    script = tmp_path / "t.py"
    script.write_text("""
import sys, select, time, machine, link
u = machine.UART(1, 115200, rxbuf=8192)
l = link.StreamLink(u, 2048)
print("open")
got = []
def h(frame, name):
    got.append(frame[6])
p = select.poll()
p.register(u, select.POLLIN)
t = time.ticks_ms()
while not p.poll(100) and time.ticks_diff(time.ticks_ms(), t) < 10000:
    pass
while u.any() < %d and time.ticks_diff(time.ticks_ms(), t) < 10000:
    time.sleep_ms(5)                  # the ISR takes the line into the ring
l.service(h)
print("frames", got, "left", u.any())
""" % len(wire))
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    env = dict(os.environ, **mcu.lab_env("esp32", tmp_path))
    env["MICROPYPATH"] += f":{REPO / 'device'}"
    try:
        p = subprocess.Popen([str(MICROPYTHON), str(script)], stdin=theirs.fileno(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        theirs.close()
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "open"  # the UART takes what comes after it is set up
        ours.sendall(wire)
        out, err = p.communicate(timeout=60)
    finally:
        ours.close()
    assert p.returncode == 0, out + err
    assert out.strip() == "frames [0, 1, 2] left 0", out + err


def test_uart_drops_what_the_line_brought_before_it_was_set_up(tmp_path: Path) -> None:
    """A board's UART receives nothing from before it was constructed (during boot nobody
    listens): a host polling through the board's reset must not leave a backlog of stale requests
    that the board answers first (the throttled Pico on its UART did not come back within the
    reset wait while it worked through them, and overran its ring)."""
    import socket

    sys.path.insert(0, str(REPO / "host"))
    from meterota.lab import mcu

    hw = mcu.hw_params("rp2", tmp_path, {"id": "t", "variant": "pico"})
    (tmp_path / "flash.bin").write_bytes(b"\xff" * 4096)
    (tmp_path / "hw.json").write_text(json.dumps(hw))
    script = tmp_path / "t.py"
    script.write_text("""
import sys, select, time, machine
u = machine.UART(1, 115200, rxbuf=4096)
print("open")
p = select.poll()
p.register(u, select.POLLIN)
t = time.ticks_ms()
while u.any() < 5 and time.ticks_diff(time.ticks_ms(), t) < 10000:
    p.poll(100)
print("got", u.read())
""")
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    env = dict(os.environ, **mcu.lab_env("rp2", tmp_path))
    try:
        ours.sendall(b"stale" * 100)  # before the board's UART exists
        p = subprocess.Popen([str(MICROPYTHON), str(script)], stdin=theirs.fileno(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        theirs.close()
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "open"
        ours.sendall(b"fresh")
        out, err = p.communicate(timeout=60)
    finally:
        ours.close()
    assert p.returncode == 0, out + err
    assert out.strip() == "got b'fresh'", out + err
