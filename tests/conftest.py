"""Shared test plumbing: the MicroPython runner, the shared vectors, simulated
devices, images and the real CLIs (meterota, smpmgr) as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "host"))

from meterota import image as img  # noqa: E402
from meterota.boards import unix_slot_size  # noqa: E402
from meterota.sim import SimDevice  # noqa: E402

BIN = Path(sys.executable).parent
MICROPYTHON = BIN / "micropython"
VECTORS = REPO.parent / "shared" / "vectors"
MP_PATH = f"{REPO / 'boards' / 'unix'}:{REPO / 'device'}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--port", default=None, help="run the end-to-end tests against a real board on this port")
    parser.addoption("--board", default=None, help="board type of --port (esp32, rp2)")


def run_mp(tmp_path: Path, code: str, heap: str = "128wK", env: dict[str, str] | None = None,
           check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run device-side code under the real MicroPython unix interpreter."""
    script = tmp_path / "mp_script.py"
    script.write_text(code)
    e = dict(os.environ, MICROPYPATH=MP_PATH)
    e.update(env or {})
    proc = subprocess.run([str(MICROPYTHON), "-X", f"heapsize={heap}", str(script)], capture_output=True,
                          text=True, env=e, timeout=timeout, cwd=tmp_path)
    if check:
        assert proc.returncode == 0, f"micropython exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def run_cli(*args: str, check: bool | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (meterota, smpmgr) as a user would."""
    e = dict(os.environ)
    e.update(env or {})
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, env=e)
    if check:
        assert proc.returncode == 0, f"{args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    return dict(json.loads((VECTORS / "smp.json").read_text()))


@pytest.fixture(scope="session")
def image_vectors() -> dict[str, Any]:
    return dict(json.loads((VECTORS / "images" / "images.json").read_text()))


class Images:
    """Application images made with the real pipeline (littlefs-python + imgtool), cached."""

    def __init__(self, base: Path):
        self.base = base
        self._cache: dict[tuple[str, str], Path] = {}

    def app(self, version: str, *, app_py: str | None = None, key: Path | None = None) -> Path:
        tag = (version, app_py or "")
        if key is None and tag in self._cache:
            return self._cache[tag]
        d = self.base / f"app-{len(self._cache)}"
        d.mkdir(parents=True)
        if app_py is not None:
            (d / "app.py").write_text(app_py)
        data = img.build_image(d, version, slot_size=unix_slot_size(), key=key)
        out = self.base / f"app-{version}-{len(self._cache)}.bin"
        out.write_bytes(data)
        if key is None:
            self._cache[tag] = out
        return out


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    return Images(tmp_path_factory.mktemp("images"))


@pytest.fixture
def make_device(tmp_path: Path) -> Iterator[Callable[..., SimDevice]]:
    """Start simulated devices (real MicroPython device code); stopped at teardown."""
    devs: list[SimDevice] = []

    def make(transport: str = "serial", name: str = "meter-0001", **kw: Any) -> SimDevice:
        d = SimDevice(tmp_path / name, device_id=name, transport=transport, **kw)  # type: ignore[arg-type]
        devs.append(d)
        d.start()
        return d

    yield make
    for d in devs:
        d.stop()


def port_of(dev: SimDevice) -> list[str]:
    """CLI arguments that address a simulated device."""
    a = dev.address
    if a.startswith("serial:"):
        return ["--port", a[len("serial:"):]]
    return ["--udp", a[len("udp:"):].rsplit(":", 1)[0]]


def smpmgr_target(dev: SimDevice) -> list[str]:
    a = dev.address
    if a.startswith("serial:"):
        return ["--port", a[len("serial:"):]]
    return ["--ip", a[len("udp:"):].rsplit(":", 1)[0]]
