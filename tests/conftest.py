"""Shared test plumbing: the MicroPython runner, the shared vectors, simulated
devices, images and the real CLIs (meterota, smpmgr) as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "host"))

from meterota import image as img  # noqa: E402
from meterota.boards import unix_slot_size  # noqa: E402
from meterota.client import SMPClient  # noqa: E402
from meterota.lab.sim import SimDevice  # noqa: E402
from meterota.transport import from_address  # noqa: E402

BIN = Path(sys.executable).parent
MICROPYTHON = BIN / "micropython"
VECTORS = REPO.parent / "shared" / "vectors"
MP_PATH = f"{REPO / 'boards' / 'unix'}:{REPO / 'device'}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--port", default=None, help="run the end-to-end tests against a real board on this port")
    parser.addoption("--board", default=None, help="board type of --port (esp32, rp2)")
    parser.addoption("--key", default=None, help="the board's HMAC key (hex); default: the key registry")
    parser.addoption("--sim-board", default=None, choices=["rp2", "esp32"],
                     help="HIL mode against a simulated board (meterota sim --board): one board for the "
                          "session, used exactly as --port uses a real one")
    parser.addoption("--sim-speed", type=float, default=1.0,
                     help="--sim-board CPU speed as a multiple of the board's (default 1.0)")


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


# How long one command may run: a simulated device's whole upgrade takes seconds; a Pico's, at its
# own speed, a few minutes (its upload runs at ~1 kB/s), so HIL mode allows more (pytest_configure).
CLI_TIMEOUT = 120.0
HIL_CLI_TIMEOUT = 900.0


def run_cli(*args: str, check: bool | None = None, timeout: float | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (meterota, smpmgr) as a user would."""
    e = dict(os.environ)
    e.update(env or {})
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout or CLI_TIMEOUT, env=e)
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
    """Application images made with the real pipeline (littlefs-python + imgtool), cached; in HIL
    mode built for the board under test (its slot size and board TLV)."""

    def __init__(self, base: Path, board: str | None = None):
        self.base = base
        self.board = board
        self._cache: dict[tuple[str, str], Path] = {}

    def app(self, version: str, *, app_py: str | None = None, key: Path | None = None) -> Path:
        tag = (version, app_py or "")
        if key is None and tag in self._cache:
            return self._cache[tag]
        d = self.base / f"app-{len(self._cache)}"
        d.mkdir(parents=True)
        if app_py is not None:
            (d / "app.py").write_text(app_py)
        if self.board:
            from meterota.boards import slot_size

            data = img.build_image(d, version, slot_size=slot_size(self.board), key=key, board=self.board)
        else:
            data = img.build_image(d, version, slot_size=unix_slot_size(), key=key)
        out = self.base / f"app-{version}-{len(self._cache)}.bin"
        out.write_bytes(data)
        if key is None:
            self._cache[tag] = out
        return out


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Images:
    board = request.config.getoption("--sim-board") or (
        (request.config.getoption("--board") or "rp2") if request.config.getoption("--port") else None)
    return Images(tmp_path_factory.mktemp("images"), board)


@dataclass
class HilTarget:
    """The board of a HIL run: a real one (--port) or a simulated one (--sim-board)."""

    port: str
    board: str
    key: bytes | None
    sim: SimDevice | None = None


def hil_mode(config: pytest.Config) -> bool:
    return bool(config.getoption("--port") or config.getoption("--sim-board"))


HIL_TEST_TIMEOUT = 1800  # s: a Pico's upgrade takes ~100 s, and each test starts with a return to factory


@pytest.fixture()
def sim_only(request: pytest.FixtureRequest) -> None:
    """For tests that need simulated devices of their own (fleets, hostile links and stores): skip
    in HIL mode, which has one board (--port, or --sim-board standing in for it: the suite behaves
    there as it would against the real one). Use: pytestmark = pytest.mark.usefixtures("sim_only")."""
    if hil_mode(request.config):
        pytest.skip("needs the simulator: simulated fleets, links or stores of its own")


def pytest_configure(config: pytest.Config) -> None:
    global CLI_TIMEOUT
    if hil_mode(config):
        CLI_TIMEOUT = HIL_CLI_TIMEOUT


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hil_mode(config):
        for item in items:
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(HIL_TEST_TIMEOUT))


@pytest.fixture(scope="session")
def hil(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HilTarget]:
    cfg = request.config
    sim_board = cfg.getoption("--sim-board")
    if sim_board:
        # As a lab rig deploys it for HIL: the factory image, downgrades allowed (each test starts
        # from 1.0.0), no REPL grace at boot.
        d = SimDevice(tmp_path_factory.mktemp("hil") / "board", device_id=f"hil-{sim_board}", board=sim_board,
                      speed=cfg.getoption("--sim-speed") or None, extra={"grace_ms": 0, "allow_downgrade": True})
        d.start(timeout=600)
        try:
            yield HilTarget(d.address[len("serial:"):], sim_board, d.key, d)
        finally:
            d.stop()
        return
    port = cfg.getoption("--port")
    if not port:
        pytest.skip("HIL only: pass --port PORT --board B, or --sim-board rp2|esp32")
    key = cfg.getoption("--key")
    yield HilTarget(port, cfg.getoption("--board") or "rp2", bytes.fromhex(key) if key else None)


class BoardDevice:
    """A real board for hardware-in-the-loop runs (pytest --port PORT --board B).

    It offers what the system tests use of SimDevice; what only a simulator can
    do (power pulled at will, exit codes, its log) skips the test. Before each
    test the board is brought back to the factory runtime 1.0.0 (deploy it with
    --allow-downgrade for HIL)."""

    def __init__(self, port: str, board: str, key: bytes | None, sim: SimDevice | None = None):
        from meterota.client import SMPClient
        from meterota.transport import from_address

        self.address = f"serial:{port}"
        self.board = board
        self.sim = sim
        # A HIL board is deployed with downgrades allowed: every test starts from the factory 1.0.0.
        self.allows_downgrade = True
        from meterota.errors import TransportError

        t = from_address(port=port)
        try:
            t.open()
        except TransportError:
            pass  # a USB port that is not back yet: _connect waits for it
        self._c = SMPClient(t, timeout=3.0)
        self._connect()
        info = self._c.device_info or {}
        self.device_id = str(info.get("id", "?"))
        if key is None:
            from meterota.store import Store

            with Store() as st:
                key = st.key(self.device_id)
        if key is None:
            pytest.fail(f"no HMAC key for {self.device_id}: pass --key or register it (meterota keys add)")
        self.key = key

    def _connect(self) -> None:
        """Connect, waiting out what the last test left: a board hung until its watchdog resets
        it (30 s on ESP32), or one still rebooting, whose USB port vanished and comes back."""
        from meterota.errors import DeviceTimeout, TransportError
        from meterota.upgrade import _reopen

        deadline = time.monotonic() + 180.0
        while True:
            try:
                self._c.connect()
                return
            except DeviceTimeout:
                if time.monotonic() > deadline:
                    raise
            except TransportError:
                if time.monotonic() > deadline:
                    raise
                _reopen(self._c)

    def baseline(self) -> None:
        """Back to the factory runtime 1.0.0, confirmed, nothing pending, from whatever state the
        last test left: a trial image (reset: it reverts), a test pending in the free slot or a
        half-done upload (erased), another uploader's session (it expires: wait, then erase)."""
        from meterota.boards import slot_size
        from meterota.client import SMPError
        from meterota.upgrade import Upgrader, _send_reset, reset_wait, wait_back

        c = self._c
        self._connect()
        info = c.info()
        if info.get("trial"):
            boots = int(info.get("boots", 0))
            _send_reset(c)
            info = wait_back(c, reset_wait(c), boots)
        busy_until = time.monotonic() + 30.0  # the device hands an idle session over after 10 s
        while True:
            try:
                c.image_erase(1)
                break
            except SMPError as e:
                if e.rc != 10 or time.monotonic() > busy_until:  # EBUSY: another uploader's session
                    raise
                time.sleep(1.0)  # polling the device's session at 1 Hz until it expires; not synchronisation
        factory = img.build_image(None, "1.0.0", slot_size=slot_size(self.board), board=self.board)
        info = c.info()
        active = next((sl for sl in info["slots"] if sl.get("active")), {})
        if active.get("hash") == img.parse(factory).hash and not info.get("trial"):
            return  # the factory image runs confirmed (a fresh board has no record to verify yet)
        Upgrader(c, None, key=self.key, allow_downgrade=True).run(factory)
        c.settle()  # the test may start with smpmgr on this port

    def ready_generation(self) -> int:
        from meterota.errors import TransportError

        try:
            return int(self._c.info()["boots"])
        except TransportError:
            # A CLI run in the test reset the board: its USB port vanished under this client
            # and came back as a new one.
            self._connect()
            return int(self._c.info()["boots"])

    def wait_ready(self, timeout: float | None = None, *, after: int | None = None) -> None:
        from meterota.upgrade import reset_wait, wait_back

        # The reset may be into a test image that reverts before it answers: two boots.
        wait_back(self._c, reset_wait(self._c, timeout, boots=2),
                  after if after is not None else self.ready_generation())

    def close(self) -> None:
        self._c.t.close()

    def start(self, *a: Any, **k: Any) -> None:
        self._needs_sim("starting the device process at will")

    def stop(self, *a: Any, **k: Any) -> None:
        self._needs_sim("stopping the device process at will")

    def _needs_sim(self, what: str) -> Any:
        pytest.skip(f"needs the simulator: {what}")

    def kill(self) -> None:
        self._needs_sim("pulling the power at a chosen instant")

    @property
    def exit_codes(self) -> list[int]:
        return self._needs_sim("the device's exit codes")  # type: ignore[no-any-return]

    def log_tail(self, n: int = 40) -> str:
        return self._needs_sim("the device's log")  # type: ignore[no-any-return]


@pytest.fixture
def make_device(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Start simulated devices (real MicroPython device code); stopped at teardown.
    With --port, hand out the real board instead (see BoardDevice)."""
    devs: list[Any] = []
    hil_on = hil_mode(request.config)

    def make(transport: str = "serial", name: str = "meter-0001", **kw: Any) -> Any:
        if hil_on:
            if kw:
                pytest.skip(f"needs the simulator: {', '.join(kw)}")
            h: HilTarget = request.getfixturevalue("hil")
            b = BoardDevice(h.port, h.board, h.key, h.sim)
            devs.append(b)
            b.baseline()
            return b
        d = SimDevice(tmp_path / name, device_id=name, transport=transport, **kw)  # type: ignore[arg-type]
        devs.append(d)
        d.start()
        return d

    yield make
    for d in devs:
        d.stop() if isinstance(d, SimDevice) else d.close()


def sim_client(dev: SimDevice, *, timeout: float = 3.0, negotiate: bool = True) -> SMPClient:
    """An SMPClient connected to a simulated device's address; the caller closes `c.t`."""
    t = from_address(port=dev.address)
    t.open()
    c = SMPClient(t, timeout=timeout)
    try:
        c.connect(negotiate=negotiate)
    except BaseException:
        t.close()
        raise
    return c


def port_of(dev: SimDevice) -> list[str]:
    """CLI arguments that address a simulated device."""
    a = dev.address
    if a.startswith("serial:"):
        return ["--port", a[len("serial:"):]]
    return ["--udp", a[len("udp:"):].rsplit(":", 1)[0]]


# smpmgr waits a fixed --timeout (2 s by default) for each reply. On a Pico with stock firmware
# (the slots as littlefs files) the upload request that completes a sector now and then takes
# littlefs's compaction of a slot directory's metadata: up to 2.8 s at the board's speed in the
# lab (`python tools/request_times.py rp2 1.0`), most requests 0.16 s. README tells smpmgr users
# the same.
SMPMGR_BOARD_TIMEOUT = 20.0


def smpmgr_target(dev: SimDevice) -> list[str]:
    """smpmgr's options that address a device (and give a board's replies their time)."""
    a = dev.address
    slow = ["--timeout", str(SMPMGR_BOARD_TIMEOUT)] if getattr(dev, "board", "unix") != "unix" else []
    if a.startswith("serial:"):
        return [*slow, "--port", a[len("serial:"):]]
    return [*slow, "--ip", a[len("udp:"):].rsplit(":", 1)[0]]


# -- the records database on both backends -------------------------------------------------
# A real PostgreSQL server from Debian's packages (tests/pg.py), started once per session
# when a test asks for it. `db_target` parametrizes a test over SQLite and PostgreSQL; the
# PostgreSQL variants carry the `pg` mark, and `make test` keeps those also marked
# `pg_core` (`make test-pg` runs them all).
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    from pg import PgServer

    s = PgServer()
    try:
        s.init()
    except Exception as e:  # noqa: BLE001 - say what is missing, fail (not skip)
        s.destroy()
        pytest.fail(f"cannot start PostgreSQL for the tests: {e}")
    yield s
    s.destroy()


@pytest.fixture(params=BACKENDS)
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The records database of one test: a SQLite file, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "db")
    return str(request.getfixturevalue("pg_server").new_database())


def db_ready(target: str) -> bool:
    """Whether a test's database exists yet (a SQLite file appears with the first command)."""
    return target.startswith("postgresql://") or Path(target).exists()
