"""HIL mode in CI: the system suite's `--port` plumbing against a simulated board
(`--sim-board`, the board's own code under its port's stand-ins), as `make hil` runs it against a
real one. `make hil-sim` runs the whole suite on both boards; this is the subset in `make test`:

- smpmgr's one-shot upgrade, which leaves the board running an unconfirmed trial image, then
- `meterota upgrade`, whose per-test return to the factory image must start from that trial
  (it refused "the device is running an unconfirmed test image" and the suite cascaded), then
- the user-errors test, which must build its images for the board under test, not for unix.

The boards run at 8 x their calibrated speed here to keep `make test` short; `make hil-sim`
runs them at 1.0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, REPO

SUBSET = [
    "tests/system/test_device_smp.py::test_smpmgr_one_shot_upgrade[serial]",
    "tests/system/test_upgrade_cli.py::test_full_upgrade_ok_with_verified_confirmation[serial]",
    "tests/system/test_upgrade_cli.py::test_user_errors_are_one_line_with_documented_exit_codes",
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("board", ["rp2", "esp32"])
def test_hil_subset_against_a_simulated_board(board: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--port") or request.config.getoption("--sim-board"):
        pytest.skip("already in HIL mode")
    proc = subprocess.run([str(BIN / "pytest"), "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
                           "--sim-board", board, "--sim-speed", "8", *SUBSET],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    m = re.search(r"(\d+) passed", proc.stdout)
    assert m and int(m.group(1)) == len(SUBSET), tail
    assert "skipped" not in proc.stdout.splitlines()[-1], tail
