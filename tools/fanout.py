"""Fan-out figures (`make fanout`): one concentrator, M simulated meters on one
simulated medium (lab.medium), one job per run, side by side in one process:

    sequential  unicast, one meter at a time (the engine before parallel slots)
    parallel    unicast, K meters at once, each upload pipelined to buf_count
    multicast   one session for all: announce, each block once (+ a parity block
                per sector with --parity on), broadcast XOR repair rounds, unicast
                repair of what is left, then test/reset/confirm per meter

    python tools/fanout.py [--meters 1,10,100] [--modes sequential,parallel,multicast]
                           [--medium shared:50k,loss=5%] [--parallel 16] [--parity on|off]
                           [--rounds N]

Per run: wall time of the job, bytes on the medium / image size, airtime on the
medium / airtime of one image, the split (broadcast, to meters, from meters),
and the concentrator's heap high-water since it booted (garbage included, and
live after a collection); requests to meters and how many were resent. The
airtime is split: image data (every broadcast frame -- pass, parity, repair
packets -- and the image bytes sent by unicast) against control (everything
else: requests, replies, the framing of unicast chunks), shown as image data
airtime / one image and control airtime per meter. The targets: 100 meters on the shared medium within 1.5 x the
airtime of one image plus their per-meter control traffic; on a star, 100
meters within 5 x one meter's time."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "host"))

from meterota import image as img  # noqa: E402
from meterota.boards import unix_slot_size  # noqa: E402
from meterota.client import SMPClient  # noqa: E402
from meterota.concentrator import Concentrator, JobSpec  # noqa: E402
from meterota.lab.fleet import Fleet, FleetOptions  # noqa: E402
from meterota.lab.medium import MediumSpec  # noqa: E402
from meterota.transport import from_address  # noqa: E402

MODES = {"sequential": (1, "unicast"), "parallel": (None, "unicast"), "multicast": (None, "multicast")}


def run(fleet: Fleet, data: bytes, version: str, mode: str, k: int) -> dict[str, Any]:
    par, how = MODES[mode]
    tr = from_address(port=fleet.concentrators[0].address)
    tr.open()
    try:
        c = SMPClient(tr, timeout=5.0)
        c.connect()
        conc = Concentrator(c)
        conc.store(data)
        info = img.parse(data)
        med = fleet.media[0]
        before = conc.status_full()
        med.reset_counts()
        t0 = time.monotonic()
        job = conc.create_job(info.hash, JobSpec(retries=3, duration=7200, parallel=par or k, mode=how))
        st = conc.wait(job, 7200)
        took = time.monotonic() - t0
        full = conc.status_full(job)
        results = list(conc.results(job))
    finally:
        tr.close()
    counts = med.snapshot()
    cmds = med.by_command()
    air1 = len(data) * 8 / med.spec.rate_bps
    fails: dict[str, int] = {}
    via: dict[str, int] = {}
    for e in results:
        via[str(e.get("via"))] = via.get(str(e.get("via")), 0) + 1
        if e["result"] != "OK":
            key = f"{e['result']}: {e['reason']}"
            fails[key] = fails.get(key, 0) + 1
    ubytes = sum(int(e.get("unicast_bytes", 0)) for e in results)
    data_bytes = counts["broadcast"]["bytes"] + ubytes
    data_air = counts["broadcast"]["airtime_s"] + ubytes * 8 / med.spec.rate_bps
    control_air = counts["total"]["airtime_s"] - data_air
    mc = [e for e in results if e.get("via") == "multicast"]
    return {"meters": fleet.m, "mode": mode, "version": version, "ok": st["ok"], "seconds": round(took, 1),
            "medium_bytes_per_image": round(counts["total"]["bytes"] / len(data), 2),
            "image_bytes_per_image": round(data_bytes / len(data), 2),
            "airtime_per_image": round(counts["total"]["airtime_s"] / air1, 2),
            "broadcast_airtime_s": round(counts["broadcast"]["airtime_s"], 1),
            "down_airtime_s": round(counts["down"]["airtime_s"], 1), "up_airtime_s": round(counts["up"]["airtime_s"], 1),
            "lost": counts["total"]["lost"], "heap_peak": full["heap_peak"], "heap_live_peak": full["heap_live_peak"],
            "via": via, "failures": fails, "requests": full["requests"] - before["requests"],
            "resent": full["resent"] - before["resent"], "k": full["jobs"][0]["parallel"],
            "image_data_airtime_per_image": round(data_air / air1, 2), "control_airtime_s": round(control_air, 1),
            "control_airtime_per_meter_s": round(control_air / fleet.m, 2),
            "broadcast_frames": counts["broadcast"]["frames"],
            "xor_packets": full.get("xor_packets", 0) - before.get("xor_packets", 0),
            "xor_blocks": full.get("xor_blocks", 0) - before.get("xor_blocks", 0),
            "members_unicast_bytes": sum(int(e.get("unicast_bytes", 0)) for e in mc),
            "members_unicast_repaired": sum(1 for e in mc if int(e.get("unicast_bytes", 0)) > 32),
            "by_command": {k: {"frames": v["frames"], "airtime_s": round(v["airtime_s"], 2)} for k, v in cmds.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meters", default="1,10,100")
    p.add_argument("--modes", default="sequential,parallel,multicast")
    p.add_argument("--medium", default="shared:50k,loss=5%")
    p.add_argument("--parallel", type=int, default=16, help="K of the parallel and multicast runs")
    p.add_argument("--parity", choices=("on", "off"), help="the concentrator's mc_parity (default: its own)")
    p.add_argument("--rounds", type=int, help="the concentrator's mc_rounds: XOR repair rounds at most")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    spec = MediumSpec.parse(a.medium)
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m}")
    versions = iter(f"1.{i}.0" for i in range(1, 100))
    images: dict[str, bytes] = {}
    cc: dict[str, Any] = {}
    if a.parity is not None:
        cc["mc_parity"] = a.parity == "on"
    if a.rounds is not None:
        cc["mc_rounds"] = a.rounds
    print(f"medium {spec}; concentrator -X heapsize=256wK, meters 128wK; K={a.parallel} {cc}; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    for n in [int(x) for x in a.meters.split(",")]:
        with tempfile.TemporaryDirectory(dir=os.environ.get("FANOUT_DIR")) as t:
            fleet = Fleet(Path(t), 1, n, FleetOptions(medium=a.medium, parallel=a.parallel, meter_reset_s=20,
                                                           concentrator_config=cc))
            t0 = time.monotonic()
            fleet.start(timeout=600)
            print(f"{n} meters up in {time.monotonic() - t0:.0f} s", flush=True)
            try:
                for mode in modes:
                    v = next(versions)
                    data = images.get(v) or img.build_image(None, v, slot_size=unix_slot_size())
                    images[v] = data
                    r = run(fleet, data, v, mode, a.parallel)
                    if a.json:
                        print(json.dumps(r), flush=True)
                    else:
                        print(f"{n:>4} meters {mode:<10} K={r['k']:<3} {r['ok']:>3} OK {r['seconds']:>7.1f} s  medium bytes "
                              f"{r['medium_bytes_per_image']:>6.2f} x image (image data {r['image_bytes_per_image']:.2f} x)"
                              f"  airtime {r['airtime_per_image']:>6.2f} x one image (broadcast "
                              f"{r['broadcast_airtime_s']} s, down {r['down_airtime_s']} s, up {r['up_airtime_s']} s)  "
                              f"heap peak {r['heap_peak'] / 1024:.0f} KiB, live {r['heap_live_peak'] / 1024:.0f} KiB"
                              f"  via {r['via']} requests {r['requests']} resent {r['resent']}", flush=True)
                        print(f"      image data airtime {r['image_data_airtime_per_image']:.2f} x one image; control "
                              f"{r['control_airtime_s']} s = {r['control_airtime_per_meter_s']:.2f} s per meter; "
                              f"broadcast frames {r['broadcast_frames']} (repair packets {r['xor_packets']}: "
                              f"{r['xor_blocks']} blocks rebuilt); members repaired by unicast "
                              f"{r['members_unicast_repaired']} ({r['members_unicast_bytes']} B); "
                              f"load {os.getloadavg()[0]:.1f}", flush=True)
                        top = sorted(dict(r["by_command"]).items(), key=lambda kv: -kv[1]["airtime_s"])  # type: ignore[call-overload]
                        print("      airtime by command: " + ", ".join(
                            f"{k} {v['frames']} frames {v['airtime_s']:.1f} s" for k, v in top[:8]), flush=True)
                        for k, c in dict(r["failures"]).items():  # type: ignore[call-overload]
                            print(f"      {c} x {k}")
            except BaseException:
                print(fleet.concentrators[0].log_tail(30), file=sys.stderr)
                raise
            finally:
                fleet.stop()
    print(f"one image: {len(images[next(iter(images))])} bytes = "
          f"{len(images[next(iter(images))]) * 8 / spec.rate_bps:.1f} s of airtime at {spec.rate_bps:g} bit/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
