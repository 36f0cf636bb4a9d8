"""Campaign scale figure (`make scale`): C simulated concentrators x M meters,
one `meterota campaign run` host process over all of them.

    python tools/scale.py [CONCENTRATORS] [METERS]      (default 10 100: 1000 meters)

Prints the outcome counts, the wall time, and the campaign process's own CPU
time and peak memory (from wait4's rusage: the simulated devices are other
processes, so they are not counted) in total and per meter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "host"))

from meterota import image as img  # noqa: E402
from meterota.boards import unix_slot_size  # noqa: E402
from meterota.lab.fleet import Fleet, FleetOptions  # noqa: E402
from meterota.store import Store  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    m = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALE_DIR")) as tmp:
        base = Path(tmp)
        image = base / "fw.img"
        image.write_bytes(img.build_image(None, "1.1.0", slot_size=unix_slot_size()))
        print(f"{n} concentrators x {m} meters, image {image.stat().st_size} bytes; starting the fleet", flush=True)
        fleet = Fleet(base / "fleet", n, m, FleetOptions(meter_reset_s=10))
        t0 = time.monotonic()
        fleet.start(timeout=600)
        print(f"fleet of {n + n * m} MicroPython processes up in {time.monotonic() - t0:.0f} s", flush=True)
        try:
            db = base / "db"
            with Store(db) as st:
                for d in fleet.meters + fleet.concentrators:
                    st.set_key(d.device_id, d.key)
            plan = base / "plan.toml"
            concs = "\n".join(f'[[group.concentrators]]\naddress = "{c.address}"' for c in fleet.concentrators)
            plan.write_text(f'[campaign]\nname = "scale"\nimage = "{image}"\nconcurrency = {n}\n'
                            f'duration = "2h"\n\n[[group]]\nname = "all"\n{concs}\n')
            t1 = time.monotonic()
            proc = subprocess.Popen([str(BIN / "meterota"), "--db", str(db), "campaign", "run", str(plan),
                                     "--id", "scale", "--json"], stdout=subprocess.PIPE, stderr=open(os.environ.get("SCALE_LOG", os.devnull), "w"))
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.monotonic() - t1
            assert proc.stdout is not None
            doc = json.loads(proc.stdout.read())
        finally:
            fleet.stop()
    meters = n * m
    cpu = ru.ru_utime + ru.ru_stime
    rss_mib = ru.ru_maxrss / 1024  # Linux: KiB
    print(f"campaign {doc['state']} {doc['reason']}: {doc['counts']} in {wall:.0f} s wall ({wall / meters:.2f} s per meter "
          f"across {n} concentrators)")
    print(f"host process: CPU {cpu:.1f} s ({cpu / meters * 1000:.1f} ms per meter), "
          f"peak RSS {rss_mib:.0f} MiB ({rss_mib * 1024 / meters:.0f} KiB per meter), "
          f"exit {os.waitstatus_to_exitcode(status)}")
    return 0 if doc["counts"].get("OK") == meters else 1


if __name__ == "__main__":
    sys.exit(main())
