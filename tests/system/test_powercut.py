"""Power-fail campaign, quick sweep (`make powercut` runs every point on a 256 KiB image)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import hil_mode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import powercut  # noqa: E402


def test_power_cuts_never_brick_the_device(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          request: pytest.FixtureRequest) -> None:
    if hil_mode(request.config):
        pytest.skip("needs the simulator: power-cut injection")
    c, results = powercut.run_campaign(tmp_path, image_kb=40, every=3, stacked=6, jobs=2)
    with capsys.disabled():
        print("\n[powercut quick sweep]\n" + powercut.summary(c, results))
    failed = [r for r in results if not r.ok]
    assert not failed, "\n\n".join(f"{r.step} op {r.op} {r.mode}: {r.detail}" for r in failed[:3])
    # Every step was cut, before and inside an operation.
    for step in c.STEPS:
        assert {r.mode for r in results if r.step == step} == {"before", "torn"}
    assert c.ops["upload"] > 20
