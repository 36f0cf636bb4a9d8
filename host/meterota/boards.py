"""Board flash maps (boards/<board>/layout.json) and the simulator's factory
provisioning: a new simulated device gets the current application bundle in
slot A, as a factory programmer would write it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from . import image

REPO = Path(__file__).resolve().parents[2]
BOARDS_DIR = REPO / "boards"
FACTORY_VERSION = "1.0.0"


def layout(board: str = "unix") -> dict[str, Any]:
    p = BOARDS_DIR / board / "layout.json"
    if not p.exists():
        raise FileNotFoundError(f"no layout for board {board!r}")
    return dict(json.loads(p.read_text()))


def unix_slot_size() -> int:
    return int(layout("unix")["slot_a"][1])


def slot_size(board: str) -> int:
    """The smallest application slot any layout of `board` gives: the bound an
    image built for that board must respect to fit every variant."""
    sizes: list[int] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("slot_a", "slot_b") and isinstance(v, list) and len(v) == 2:
                    sizes.append(int(v[1]))
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(layout(board))
    if not sizes:
        raise ValueError(f"layout of board {board!r} names no slots")
    return min(sizes)


def firmware_slot_size(board: str) -> int:
    """The smallest OTA app partition (ota_N) of `board`'s layouts: the bound of
    a native firmware image (meterota image build --firmware)."""
    sizes: list[int] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k.startswith("ota_") and isinstance(v, list) and len(v) == 2:
                    sizes.append(int(v[1]))
                else:
                    walk(v)

    walk(layout(board))
    if not sizes:
        raise ValueError(f"board {board!r} has no OTA app partitions: no native firmware images")
    return min(sizes)


@functools.lru_cache(maxsize=4)
def factory_image(version: str = FACTORY_VERSION) -> bytes:
    """The current device runtime as a signed-by-hash MCUboot image (cached per process)."""
    return image.build_image(None, version, slot_size=unix_slot_size())


def provision_unix(state_dir: Path, img: bytes | None = None) -> None:
    """Write flash.bin for a new simulated device: erased flash, image in slot A."""
    lay = layout("unix")
    img = factory_image() if img is None else img
    a_off, a_size = lay["slot_a"]
    if len(img) > a_size:
        raise ValueError("factory image larger than slot A")
    flash = bytearray(b"\xff" * lay["flash_size"])
    flash[a_off:a_off + len(img)] = img
    tmp = state_dir / "flash.bin.tmp"
    tmp.write_bytes(flash)
    tmp.replace(state_dir / "flash.bin")


def unix_config_extra() -> dict[str, Any]:
    """config.json entries every simulated device needs: its flash map."""
    lay = layout("unix")
    return {"layout": {k: lay[k] for k in ("flash_size", "meta", "slot_a", "slot_b", "store", "jobs")}}
