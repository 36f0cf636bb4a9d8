"""Fan-out figures: one concentrator, M simulated meters, one job.

    python tools/fanout.py 20 100

Prints, per run: meters, job time, image bytes sent over the meters' links,
and the concentrator's heap after the job (live bytes after a collection)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "host"))

from meterota import image as img  # noqa: E402
from meterota.boards import unix_slot_size  # noqa: E402
from meterota.client import SMPClient  # noqa: E402
from meterota.concentrator import Concentrator, JobSpec  # noqa: E402
from meterota.lab.fleet import Fleet, FleetOptions  # noqa: E402
from meterota.transport import from_address  # noqa: E402


def run(meters: int, data: bytes) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("FANOUT_DIR")) as t:
        f = Fleet(Path(t), 1, meters, FleetOptions())
        t0 = time.monotonic()
        f.start(timeout=300)
        started = time.monotonic() - t0
        try:
            tr = from_address(port=f.concentrators[0].address)
            tr.open()
            c = SMPClient(tr, timeout=3.0)
            c.connect()
            conc = Concentrator(c)
            conc.store(data)
            t1 = time.monotonic()
            job = conc.create_job(img.parse(data).hash, JobSpec(retries=1, duration=3600))
            st = conc.wait(job, 3600)
            took = time.monotonic() - t1
            reasons: dict[str, int] = {}
            for e in conc.results(job):
                if e["result"] != "OK":
                    k = f"{e['result']}: {e['reason']}"
                    reasons[k] = reasons.get(k, 0) + 1
            stats = c.stats()
            tr.close()
        except BaseException:
            for d in f.concentrators:
                print(d.log_tail(30), file=sys.stderr)
            raise
        finally:
            f.stop()
    return {"meters": meters, "ok": st["ok"], "seconds": took, "per_meter": took / meters,
            "bytes": len(data) * st["ok"], "start_s": started, "heap_alloc": stats["heap_alloc"],
            "failures": reasons}


def main() -> int:
    data = img.build_image(None, "1.1.0", slot_size=unix_slot_size())
    print(f"image {len(data)} bytes; meters -X heapsize=128wK, concentrator 256wK")
    for m in [int(x) for x in sys.argv[1:]] or [20]:
        r = run(m, data)
        print(f"{r['meters']:>4} meters: {r['ok']} OK in {r['seconds']:.1f} s ({r['per_meter']:.2f} s/meter), "
              f"{r['bytes'] / 1e6:.1f} MB to meters, fleet start {r['start_s']:.0f} s, "
              f"concentrator heap live {r['heap_alloc'] / 1024:.1f} KiB after the job", flush=True)
        for k, n in r["failures"].items():
            print(f"      {n} x {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
