"""HIL mode in CI: the system suite's `--port` plumbing against a simulated board
(`--sim-board`, the board's own code under its port's stand-ins), as `make hil` runs it against a
real one. `make hil-sim` runs the whole suite on both boards at their calibrated speed; this is
the subset in `make test`, on the simulated Pico at 16 x its speed (the plumbing is under test
here, not the board's pace):

- smpmgr's one-shot upgrade, which leaves the board running an unconfirmed trial image, then
- `meterota upgrade`, whose per-test return to the factory image must start from that trial
  (it refused "the device is running an unconfirmed test image" and the suite cascaded).

The user-errors test (images for the board under test, not for unix) and the rest run in
`make hil-sim`."""

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
]


@pytest.mark.timeout(600)
def test_hil_subset_against_a_simulated_pico(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--port") or request.config.getoption("--sim-board"):
        pytest.skip("already in HIL mode")
    proc = subprocess.run([str(BIN / "pytest"), "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
                           "--sim-board", "rp2", "--sim-speed", "16", *SUBSET],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    m = re.search(r"(\d+) passed", proc.stdout)
    assert m and int(m.group(1)) == len(SUBSET), tail
    assert "skipped" not in proc.stdout.splitlines()[-1], tail
