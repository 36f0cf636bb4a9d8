"""MicroPython's extensible built-ins (io, time, os, struct, select, ...) are looked for on
sys.path before the built-in is used, at every `import` statement that names one: they are
not kept in sys.modules. The receiver runs with the application bundle's mount (/app) first in
sys.path, and on a Pico in files mode that mount reads the slot through littlefs sector files:
an `import io` inside a request handler cost each compressed upload block three bundle lookups,
littlefs reads and a 1.2 KB open-file allocation (the heap bisection on the simulated Pico failed
there, "allocating 1200 bytes", at 60wK). The boot stage registers them in sys.modules, and
resident code imports them at module level."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO, run_mp
from test_rp2_file_sectors import CODE as RP2_CODE

DEVICE = REPO / "device"

CODE = r"""
import os, sys, vfs
import grp_image, smp

%(ram)s
dev = Ram(16)  # counting reads, as mtboot.BundleDevice is read under /app
vfs.VfsLfs2.mkfs(dev, readsize=64, progsize=64, lookahead=32)
vfs.mount(vfs.VfsLfs2(dev, readsize=64, progsize=64, lookahead=32), "/app")
sys.path.insert(0, "/app")

NAMES = %(names)r
ext = []
for name in NAMES:
    dev.reads = 0
    __import__(name)
    if dev.reads:
        ext.append(name)
print("EXT", " ".join(ext))

# A compressed upload block's handler up to its first check (a block without `rlen` is refused
# before any session is touched): nothing of it may look on sys.path.
dev.reads = 0
try:
    grp_image.ImageGroup.upload_deflated(None, {"off": 0})
except smp.MgmtError as e:
    print("RC", e.rc)
print("READS", dev.reads)

# The boot stage registers them in sys.modules: then no import of one looks on sys.path,
# in resident code or in the modules a rare request loads (policy, imgstate...).
import mtboot
dev.reads = 0
for name in ext:
    __import__(name)
print("AFTER", dev.reads)
"""

# Built-ins the device code imports (the candidates for "extensible").
BUILTINS = ["io", "time", "os", "struct", "select", "binascii", "hashlib", "json", "errno", "array",
            "gc", "sys", "micropython", "deflate", "vfs"]

# Functions that run once per boot (or once per device lifetime), where a lookup costs nothing
# that matters: they may import an extensible built-in where it is used.
ONCE = {
    ("framing.py", "_make_table"),  # the CRC table, built once at import
    ("stdin_stream.py", "__init__"),  # the console stream, opened once
    ("mtboot.py", "run"),  # the boot stage's grace period, before any receiver
}


def _resident() -> set[str]:
    """The device modules the receiver keeps loaded: receiver.py and what it and they import at
    module level."""
    seen: set[str] = set()
    todo = ["receiver", "link", "linkcfg", "stdin_stream", "mtboot"]
    while todo:
        name = todo.pop()
        path = DEVICE / f"{name}.py"
        if name in seen or not path.exists():
            continue
        seen.add(name)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                todo.append(node.module)
    return seen


def test_resident_request_code_imports_no_extensible_builtin_in_a_function(tmp_path: Path) -> None:
    ram = RP2_CODE[RP2_CODE.index("class Ram:"):RP2_CODE.index("dev = Ram(352)")]  # a counting block device
    out = run_mp(tmp_path, CODE % {"names": BUILTINS, "ram": ram}, heap="512wK").stdout
    lines = dict(ln.split(" ", 1) if " " in ln else (ln, "") for ln in out.splitlines())
    ext = set(lines["EXT"].split())
    # The premise, on this MicroPython: these search sys.path at each import statement.
    assert {"io", "time", "os", "struct", "select"} <= ext, ext
    assert lines["RC"] == "3", out  # EINVAL
    assert lines["READS"] == "0", out  # before: 'import io' in the handler read the bundle
    assert lines["AFTER"] == "0", out  # before mtboot registered them: 3 lookups each

    found = []
    for name in sorted(_resident()):
        tree = ast.parse((DEVICE / f"{name}.py").read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if (f"{name}.py", fn.name) in ONCE:
                continue
            for node in ast.walk(fn):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                found += [f"{name}.py:{node.lineno} {fn.name}: import {m}" for m in names if m in ext]
    assert not found, found
