"""Campaign scale figure (`make scale`): C simulated concentrators x M meters,
one `meterota campaign run` host process over all of them.

    python tools/scale.py [CONCENTRATORS] [METERS]      (default 10 100: 1000 meters)
    python tools/scale.py --workers 1,2,4 [C] [M] [DIRECT]  (make scale-workers)

With --workers, the ledger is on a real PostgreSQL (tests/pg.py starts one in a
temporary folder) and each count of workers runs its own campaign (a new image
version each time) over the same fleet plus DIRECT direct devices: wall time
(and its ratio to one worker), the workers' CPU per device, PostgreSQL write
transactions per device; with --kill, the second worker is SIGKILLed at half
the campaign and the takeover time (kill to the first takeover event) is given.

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
    if "--workers" in sys.argv:
        return workers_main()
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


def workers_main() -> int:
    import signal

    sys.path.insert(0, str(REPO / "tests"))
    from pg import PgServer  # type: ignore[import-not-found]  # noqa: E402

    from meterota.campaign.ledger import Ledger  # noqa: E402
    from meterota.lab.sim import SimDevice  # noqa: E402

    argv = [a for a in sys.argv[1:]]
    counts = [int(x) for x in argv[argv.index("--workers") + 1].split(",")]
    kill = "--kill" in argv
    rest = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or argv[i - 1] != "--workers")]
    n, m, nd = (int(rest[0]) if rest else 10), (int(rest[1]) if len(rest) > 1 else 100), (
        int(rest[2]) if len(rest) > 2 else 50)
    total = n * m + nd
    pg = PgServer()
    pg.init()
    rc = 0
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALE_DIR")) as tmp:
        base = Path(tmp)
        fleet = Fleet(base / "fleet", n, m, FleetOptions(meter_reset_s=10))
        directs = [SimDevice(base / f"d{i}", device_id=f"direct-{i:03d}", transport="udp") for i in range(nd)]
        t0 = time.monotonic()
        fleet.start(timeout=600)
        for d in directs:
            d.start(timeout=600)
        print(f"{n} concentrators x {m} meters + {nd} direct devices ({total}) up in {time.monotonic() - t0:.0f} s",
              flush=True)
        base_wall = None
        try:
            for k, workers in enumerate(counts):
                url = pg.new_database()
                with Store(url) as st:
                    for d in fleet.meters + fleet.concentrators + directs:
                        st.set_key(d.device_id, d.key)
                image = base / f"fw{k}.img"
                image.write_bytes(img.build_image(None, f"1.{k + 1}.0", slot_size=unix_slot_size()))
                plan = base / f"plan{k}.toml"
                concs = "\n".join(f'[[group.concentrators]]\naddress = "{c.address}"' for c in fleet.concentrators)
                devs = json.dumps([d.address for d in directs])
                plan.write_text(f'[campaign]\nname = "scale"\nimage = "{image}"\nconcurrency = 4\n'
                                f'duration = "2h"\n\n[[group]]\nname = "all"\ndevices = {devs}\n{concs}\n')
                x0 = int(pg.psql("SELECT pg_current_xact_id()::text::bigint"))
                log = open(os.environ.get("SCALE_LOG", os.devnull), "a")
                t1 = time.monotonic()
                procs = [subprocess.Popen([str(BIN / "meterota"), "--db", url, "campaign", "run", str(plan), "--id",
                                           f"s{k}", "--json", "--lease", "5"], stdout=subprocess.PIPE, stderr=log)]
                if workers > 1:
                    with Store(url) as st:  # the workers join once the campaign exists (--until-idle)
                        led = Ledger(st)
                        while led.campaign(f"s{k}") is None:
                            time.sleep(0.1)  # polling the ledger for the campaign; not synchronisation
                for _ in range(workers - 1):
                    procs.append(subprocess.Popen([str(BIN / "meterota"), "--db", url, "campaign", "worker",
                                                   "--concurrency", "4", "--lease", "5", "--until-idle", "--json"],
                                                  stdout=subprocess.PIPE, stderr=log, start_new_session=True))
                killed_at = None
                if kill and workers > 1:
                    with Store(url) as st:
                        led = Ledger(st)
                        while killed_at is None:
                            c = led.counts(f"s{k}").get("", {}) if led.campaign(f"s{k}") else {}
                            if c.get("OK", 0) >= total // 2:
                                os.killpg(procs[1].pid, signal.SIGKILL)
                                killed_at = time.time()
                            time.sleep(0.2)  # polling the ledger for the moment to kill
                cpu = 0.0
                for p in procs:
                    _, _, ru = os.wait4(p.pid, 0)
                    cpu += ru.ru_utime + ru.ru_stime
                wall = time.monotonic() - t1
                x1 = int(pg.psql("SELECT pg_current_xact_id()::text::bigint"))
                assert procs[0].stdout is not None
                doc = json.loads(procs[0].stdout.read())
                took = []
                for p in procs[1:]:
                    assert p.stdout is not None
                    got = p.stdout.read()
                    took.append(str(json.loads(got)["units"]) if got.strip() else "killed")
                base_wall = base_wall or wall
                line = (f"{workers} worker(s): {doc['state']} {doc['counts']} in {wall:.0f} s wall "
                        f"(x{base_wall / wall:.2f} vs the first), CPU {cpu / total * 1000:.1f} ms per device, "
                        f"{(x1 - x0) / total:.1f} PostgreSQL write transactions per device"
                        + (f"; units taken by the other workers: {', '.join(took)}" if took else ""))
                if killed_at is not None:
                    from meterota.confirm import verify  # noqa: E402

                    keys = {d.device_id: d.key for d in fleet.meters + directs}
                    with Store(url) as st:
                        led = Ledger(st)
                        evs = led.events(f"s{k}")
                        tk = [e["t"] for e in evs if e["kind"] == "takeover"]
                        ends: dict[str, int] = {}
                        for e in evs:
                            if e["kind"] == "result":
                                ends[e["target"]] = ends.get(e["target"], 0) + 1
                        rows = led.devices(f"s{k}")
                        # One upgrade per device: its record is its first since the fleet started (seq 1).
                        first = sum(r["record"] is not None and verify(bytes(r["record"]), bytes(r["mac"]),
                                                                       keys[r["device"]]).seq == 1 for r in rows)
                    line += f"; a worker killed at half: takeover after {min(tk) - killed_at:.1f} s" if tk else \
                        "; a worker killed at half: no unit of it to take over"
                    line += (f"; {sum(v == 1 for v in ends.values())}/{len(rows)} devices ended once, "
                             f"{first}/{len(rows)} on their first confirmation record (none flashed twice)")
                print(line, flush=True)
                if doc["counts"].get("OK") != total:
                    rc = 1
        finally:
            fleet.stop()
            for d in directs:
                d.stop()
            pg.destroy()
    return rc


if __name__ == "__main__":
    sys.exit(main())
