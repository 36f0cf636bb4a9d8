"""Power-cut campaign: cut the power before and inside every flash operation of
each step of an upgrade, restart the device and check that it never bricks.

    python tools/powercut.py [--every N] [--image-kb K] [--stacked R] [--jobs J]

For each step (upload, mark for test, first boot, confirm, revert) it counts the
flash operations, then for every operation n and mode (before, torn) restores
the flash as it was before the step, runs the step with MTR_POWERFAIL=n:mode:n,
powers the device up again (the boot stage decides) and checks: a valid image
boots (the old or the new one, never neither); the boot state is consistent;
every slot reported bootable passes a hash check done here, independently of
the device code; the bundle mounts; and driving the upgrade again completes.
Device code runs under MicroPython (boards/unix, tools/powercut_device.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "host"))

from meterota import image as img  # noqa: E402
from meterota.boards import layout, provision_unix, unix_config_extra, unix_slot_size  # noqa: E402

MICROPYTHON = Path(sys.executable).parent / "micropython"
DEVICE_SCRIPT = REPO / "tools" / "powercut_device.py"
ENV = dict(os.environ, MICROPYPATH=f"{REPO / 'boards' / 'unix'}:{REPO / 'device'}")
ENV.pop("MTR_POWERFAIL", None)
HEAP = "128wK"
POWERFAIL_EXIT = 86
MODES = ("before", "torn")
NONE = 0xFF


class CampaignError(AssertionError):
    pass


@dataclass
class Result:
    step: str
    op: int
    mode: str
    ok: bool
    detail: str = ""


@dataclass
class Campaign:
    work: Path
    new_image: Path
    old_hash: str = ""
    new_hash: str = ""
    snapshots: dict[str, Path] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)

    STEPS = {"upload": ("S0", "upload"), "test": ("S1", "test"), "first-boot": ("S2", "boot"),
             "confirm": ("S3", "confirm"), "revert": ("S3", "boot")}
    # What may run after a cut in each step and the next power-on: (image, on trial).
    # A reset during a trial reverts, so "new, on trial" only follows a pending mark.
    ALLOWED = {"upload": {("old", False)},
               "test": {("old", False), ("new", True)},
               "first-boot": {("old", False), ("new", True)},
               "confirm": {("old", False), ("new", False)},
               "revert": {("old", False)}}

    # -- device runs -----------------------------------------------------------------------------
    def run(self, state: Path, action: str, powerfail: str | None = None) -> tuple[int, str]:
        env = dict(ENV)
        if powerfail:
            env["MTR_POWERFAIL"] = powerfail
        p = subprocess.run([str(MICROPYTHON), "-X", f"heapsize={HEAP}", str(DEVICE_SCRIPT), str(state), action,
                            str(self.new_image)], capture_output=True, text=True, env=env, timeout=120)
        return p.returncode, p.stdout + p.stderr

    def run_ok(self, state: Path, action: str) -> str:
        rc, out = self.run(state, action)
        if rc != 0:
            raise CampaignError(f"{action} failed ({rc}):\n{out}")
        return out

    # -- setup -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Snapshots of the flash before each step, and the op count of each step."""
        s = self.work / "setup"
        s.mkdir(parents=True)
        (s / "config.json").write_text(json.dumps({"id": "pc", "key": "00" * 32, **unix_config_extra()}))
        provision_unix(s)
        self.old_hash = img.parse(_slot(s, 0)).hash.hex()
        self.new_hash = img.parse(self.new_image.read_bytes()).hash.hex()
        self.run_ok(s, "boot")
        for name, action in (("S0", None), ("S1", "upload"), ("S2", "test"), ("S3", "boot")):
            if action:
                self.run_ok(s, action)
            snap = self.work / f"{name}.flash"
            shutil.copy(s / "flash.bin", snap)
            self.snapshots[name] = snap
        shutil.copy(s / "config.json", self.work / "config.json")
        for step, (snap, action) in self.STEPS.items():
            d = self._fresh(f"count-{step}", snap)
            out = self.run_ok(d, action)
            self.ops[step] = int(out.rsplit("OPS", 1)[1].split()[0])
            shutil.rmtree(d)

    def _fresh(self, name: str, snap: str) -> Path:
        d = self.work / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        shutil.copy(self.work / "config.json", d / "config.json")
        shutil.copy(self.snapshots[snap], d / "flash.bin")
        return d

    # -- one cut ------------------------------------------------------------------------------
    def cut(self, step: str, n: int, mode: str) -> Result:
        snap, action = self.STEPS[step]
        d = self._fresh(f"cut-{step}-{n}-{mode}", snap)
        try:
            rc, out = self.run(d, action, f"{n}:{mode}:{n}")
            if rc != POWERFAIL_EXIT:
                raise CampaignError(f"expected a power failure at op {n}, got exit {rc}:\n{out}")
            rep = self.check_after_cut(d)
            got = ("new" if rep["images"][0]["hash"] == self.new_hash else "old", bool(rep["trial"]))
            if got not in self.ALLOWED[step]:
                raise CampaignError(f"after a cut in {step}: runs {got}, allowed {self.ALLOWED[step]}: {rep}")
            self.check_completes(d)
            return Result(step, n, mode, True)
        except CampaignError as e:
            return Result(step, n, mode, False, str(e))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def check_after_cut(self, d: Path) -> dict[str, Any]:
        rep = _report(self.run_ok(d, "check"))
        if not rep["state_valid"]:
            raise CampaignError(f"the boot state was lost: {rep}")
        if rep["boot"] < 0:
            raise CampaignError(f"no image boots after the cut: {rep}")
        by_slot = {e["slot"]: e for e in rep["images"]}
        active = by_slot.get(0)
        if active is None or active["hash"] not in (self.old_hash, self.new_hash):
            raise CampaignError(f"booted image is neither the old nor the new one: {rep}")
        if rep["trial"] and active["hash"] != self.new_hash:
            raise CampaignError(f"on trial with something other than the new image: {rep}")
        if rep["pending"] not in (NONE, rep["phys"][1]):
            raise CampaignError(f"pending points at the running slot: {rep}")
        if rep["files"] <= 0:
            raise CampaignError(f"the booted bundle does not mount or is empty: {rep}")
        # Independent check (CPython, imgtool's format rules): every slot the
        # device reports bootable really holds an image whose hash verifies.
        for e in rep["images"]:
            phys = rep["phys"][e["slot"]]
            info = img.parse(_slot(d, phys))
            if not info.hash_ok or info.hash.hex() != e["hash"]:
                raise CampaignError(f"slot {'AB'[phys]} reported bootable but fails its hash: {rep}")
        return rep

    def check_completes(self, d: Path) -> None:
        rep = _report(self.run_ok(d, "drive"))
        by_slot = {e["slot"]: e for e in rep["images"]}
        if by_slot[0]["hash"] != self.new_hash or not by_slot[0]["confirmed"] or rep["trial"]:
            raise CampaignError(f"running the upgrade again did not end confirmed on the new image: {rep}")

    # -- stacked cuts ---------------------------------------------------------------------------
    def stacked(self, seed: int) -> Result:
        """Two or three cuts at random points of one whole upgrade, then let it finish."""
        rnd = random.Random(seed)
        d = self._fresh(f"stacked-{seed}", "S0")
        total = sum(self.ops.values()) + 8
        try:
            for _ in range(rnd.choice((2, 3))):
                n = rnd.randint(1, total)
                mode = rnd.choice(MODES)
                rc, out = self.run(d, "drive", f"{n}:{mode}:{seed}")
                if rc not in (0, POWERFAIL_EXIT):
                    raise CampaignError(f"drive failed ({rc}) with a cut at {n}:{mode}:\n{out}")
                self.check_after_cut(d)
            self.check_completes(d)
            return Result("stacked", seed, "random", True)
        except CampaignError as e:
            return Result("stacked", seed, "random", False, str(e))
        finally:
            shutil.rmtree(d, ignore_errors=True)


def _report(out: str) -> dict[str, Any]:
    for line in out.splitlines():
        if line.startswith("REPORT "):
            return dict(json.loads(line[7:]))
    raise CampaignError(f"no report:\n{out}")


def _slot(d: Path, phys: int) -> bytes:
    lay = layout("unix")
    off, size = lay["slot_a" if phys == 0 else "slot_b"]
    with open(d / "flash.bin", "rb") as f:
        f.seek(off)
        return f.read(size)


def make_image(path: Path, kb: int) -> Path:
    """A new application image of about `kb` KiB (runtime plus padding data)."""
    with tempfile.TemporaryDirectory() as t:
        app = Path(t)
        pad = max(0, kb * 1024 - 40 * 1024)
        if pad:
            (app / "data.bin").write_bytes(random.Random(kb).randbytes(pad))
        path.write_bytes(img.build_image(app, "2.0.0", slot_size=unix_slot_size()))
    return path


def run_campaign(work: Path, image_kb: int = 40, every: int = 1, stacked: int = 0, jobs: int = 2,
                 progress: bool = False) -> tuple[Campaign, list[Result]]:
    c = Campaign(work, make_image(work / "new.bin", image_kb))
    c.prepare()
    todo = [(s, n, m) for s in c.STEPS for n in range(1, c.ops[s] + 1) for m in MODES if n % every == 0 or n == 1
            or n == c.ops[s]]
    results: list[Result] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for r in pool.map(lambda a: c.cut(*a), todo):
            results.append(r)
            if progress and len(results) % 50 == 0:
                print(f"  {len(results)}/{len(todo)} cut points", file=sys.stderr, flush=True)
        results += list(pool.map(c.stacked, range(stacked)))
    return c, results


def summary(c: Campaign, results: list[Result]) -> str:
    lines = [f"{'step':<11} {'flash ops':>9} {'cut points':>10} {'passed':>7}"]
    for step in list(c.STEPS) + ["stacked"]:
        rs = [r for r in results if r.step == step]
        if rs:
            lines.append(f"{step:<11} {c.ops.get(step, 0):>9} {len(rs):>10} {sum(r.ok for r in rs):>7}"
                         + ("" if step == "stacked" else
                            f"   (before {sum(r.ok for r in rs if r.mode == 'before')}/"
                            f"{sum(r.mode == 'before' for r in rs)}, torn {sum(r.ok for r in rs if r.mode == 'torn')}/"
                            f"{sum(r.mode == 'torn' for r in rs)})"))
    lines.append(f"{'total':<11} {'':>9} {len(results):>10} {sum(r.ok for r in results):>7}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=1, help="cut at every Nth flash operation (1 = all)")
    ap.add_argument("--image-kb", type=int, default=256, help="size of the new image (default 256 KiB)")
    ap.add_argument("--stacked", type=int, default=40, help="runs with 2-3 random cuts in one upgrade")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="powercut-") as t:
        c, results = run_campaign(Path(t), args.image_kb, args.every, args.stacked, args.jobs, progress=True)
    print(summary(c, results))
    print(f"{len(results)} cut scenarios in {time.monotonic() - t0:.0f} s")
    bad = [r for r in results if not r.ok]
    for r in bad[:5]:
        print(f"FAILED {r.step} op {r.op} {r.mode}: {r.detail}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
