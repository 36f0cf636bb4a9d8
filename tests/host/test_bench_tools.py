"""The bench tools build what they measure: `tools/bench_boards.py`'s full (not --quick) rows
sign an image with a realistic application for each board (they failed at mpy-cross when the
host modules went in as .py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import bench_boards  # noqa: E402


@pytest.mark.parametrize("board", ["unix", "rp2", "esp32"])
def test_full_bench_app_image_builds(tmp_path: Path, board: str) -> None:
    app = bench_boards.realistic_app(tmp_path / "app")
    data = bench_boards._image(board, "1.1.0", app)
    quick = bench_boards._image(board, "1.1.0", None)
    # The application's data is in the image: it is larger than the runtime alone by most of it.
    app_bytes = sum(p.stat().st_size for p in app.iterdir())
    assert len(data) - len(quick) > app_bytes // 2
