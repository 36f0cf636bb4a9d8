"""Campaign scale figure (`make scale`): C simulated concentrators x M meters,
one `meterota campaign run` host process over all of them.

    python tools/scale.py [CONCENTRATORS] [METERS]      (default 10 100: 1000 meters)
    python tools/scale.py 10 100 --publish [--outage]   the same with every outcome on a Mosquitto
    python tools/scale.py --publisher-only 1000 [--outage]   the publisher alone over a ledger of N outcomes
    python tools/scale.py --workers 1,2,4 [C] [M] [DIRECT]  (make scale-workers)

With --workers, the ledger is on a real PostgreSQL (tests/pg.py starts one in a
temporary folder) and each count of workers runs its own campaign (a new image
version each time) over the same fleet plus DIRECT direct devices: wall time
(and its ratio to one worker), the workers' CPU per device, PostgreSQL write
transactions per device; with --kill, the second worker is SIGKILLed at half
the campaign and the takeover time (kill to the first takeover event) is given.

Prints the outcome counts, the wall time, and the campaign process's own CPU
time and peak memory (from wait4's rusage: the simulated devices are other
processes, so they are not counted) in total and per meter.

--publish: a real Mosquitto (Debian's package) on a free loopback port, the campaign run with
--publish, and a consumer counting what arrives: device messages per second through the broker,
the delay from outcome to consumer, duplicates and losses (outbox rows never received). --outage:
the broker is killed when a third of the outcomes arrived and restarted when another third were
recorded; the counts after its return are printed too."""

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


CONSUMER = """
import json, sys, time
sys.path.insert(0, sys.argv[2])
from meterota.events import parse_url
from meterota.publish import PublishError, connect
url = parse_url(sys.argv[1])
def on_message(_c, _u, msg):
    print(f"{time.time()!r} {msg.payload.decode()}", flush=True)
def on_sub(*_a):
    print("subscribed", flush=True)
while True:
    try:
        c, state = connect(url, "scale-consumer", on_message=on_message)
    except PublishError:
        time.sleep(0.2)
        continue
    c.on_subscribe = on_sub
    c.subscribe([(url.topic("devices/+/upgrade"), 1)])
    while state["connected"]:
        c.loop(0.1)
"""


class Consumer:
    """A subscriber on the broker, in a process of its own (this one holds the fleet's
    thousands of descriptors, beyond what paho's select() takes): every device message
    with its arrival time, repeats included."""

    def __init__(self, url: str):
        import threading

        self.got: list[tuple[float, dict]] = []  # type: ignore[type-arg]
        self.subscriptions = 0
        self.cv = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-c", CONSUMER, url, str(REPO / "host")],
                                     stdout=subprocess.PIPE, text=True, close_fds=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.wait(lambda: self.subscriptions >= 1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cv:
                if line.startswith("subscribed"):
                    self.subscriptions += 1
                else:
                    t, _, doc = line.partition(" ")
                    d = json.loads(doc)
                    if d["type"] != "campaign":
                        self.got.append((float(t), d))
                self.cv.notify_all()

    def wait(self, pred, timeout: float = 3600) -> bool:  # type: ignore[no-untyped-def]
        with self.cv:
            return self.cv.wait_for(pred, timeout)

    def ids(self) -> set[str]:
        with self.cv:
            return {d["id"] for _, d in self.got}

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.thread.join()


def outage_figures(db: Path, con: Consumer, t_back: float | None, t0: float) -> str:
    """Delivery through the broker against the outbox: messages, deliveries, duplicates,
    losses, order per device, delivered after the broker's return."""
    import sqlite3

    from meterota.events import device_topic

    rows = sqlite3.connect(str(db)).execute(
        "SELECT msg_id, topic, created, sent FROM outbox WHERE kind != 'campaign' ORDER BY id").fetchall()
    want = [r[0] for r in rows]
    with con.cv:
        got = list(con.got)
    first: dict[str, float] = {}
    order: dict[str, list[str]] = {}
    for t, d in got:
        if d["id"] not in first:
            first[d["id"]] = t
            order.setdefault(device_topic(d["device"]), []).append(d["id"])
    want_order: dict[str, list[str]] = {}
    for r in rows:
        want_order.setdefault(r[1], []).append(r[0])
    lost = len(set(want) - set(first))
    created = {r[0]: r[2] for r in rows}
    delays = sorted(first[i] - created[i] for i in first if i in created)
    span = (max(first.values()) - min(first.values())) if first else 0.0
    out = [f"broker: {len(want)} device messages, {len(got)} deliveries, {len(got) - len(first)} duplicates, "
           f"{lost} lost, order per device {'kept' if order == want_order else 'BROKEN'}, "
           f"{sum(r[3] is None for r in rows)} unsent",
           f"  {len(first) / max(span, 1e-9):.0f} outcomes/s through the broker (first to last arrival over "
           f"{span:.1f} s); outcome to consumer: median {delays[len(delays) // 2] * 1000:.0f} ms, "
           f"max {delays[-1] * 1000:.0f} ms" if delays else "  nothing arrived"]
    if t_back is not None:
        after = sum(1 for i, t in first.items() if t >= t_back)
        out.append(f"  delivered after the broker came back: {after} (broker down {t_back - t0:.1f} s)")
    return "\n".join(out)


def publisher_only(n: int, outage: bool) -> int:
    """The publisher alone: N final outcomes written through the real ledger as fast as the
    ledger takes them, drained to a real broker while they are written."""
    import threading

    from meterota.campaign.ledger import Ledger
    from meterota.events import parse_url
    from meterota.lab.broker import Mosquitto, TCPCut
    from meterota.publish import Publisher

    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALE_DIR")) as tmp:
        base = Path(tmp)
        b = Mosquitto(base / "broker").start()
        cut = TCPCut(b.port)
        con = Consumer(b.url("scale"))
        try:
            st = Store(base / "db")
            st.enable_outbox()
            led = Ledger(st)
            led.create_campaign("scale", "scale", {}, None, "ab" * 32, "1.1.0+0")
            ts = [f"meter-{i:05d}" for i in range(n)]
            for t in ts:
                led.add_target("scale", t, "all", "meter", device=t, via="conc", address="udp:127.0.0.9",
                               image_hash="ab" * 32, version="1.1.0+0")
            warned: list[str] = []
            pub = Publisher(st, parse_url(f"mqtt://127.0.0.1:{cut.port}/scale"), warn=warned.append).start()
            t0 = time.monotonic()
            w0 = time.time()
            t_down = t_back = None
            for i, t in enumerate(ts):
                if outage and i == n // 3:
                    b.kill()
                    cut.cut()
                    t_down = time.time()
                if outage and i == 2 * n // 3:
                    b.start()
                    con.wait(lambda: con.subscriptions >= 2)
                    t_back = time.time()
                    cut.restore()
                led.finish_device("scale", t, "OK", "confirmed", final=True)
            written = time.monotonic() - t0
            con.wait(lambda: len(con.ids()) >= n, timeout=600)
            total = time.monotonic() - t0
            left = pub.close(30)
            print(f"publisher only: {n} outcomes written through the ledger in {written:.2f} s "
                  f"({n / written:.0f}/s, outbox rows in the same transactions); all {n} at the consumer after "
                  f"{total:.2f} s ({n / total:.0f} outcomes/s end to end); {left} unsent; "
                  f"{len(warned)} warning(s){': ' + warned[0] if warned else ''}")
            print(outage_figures(base / "db", con, t_back, t_down or w0))
            # The drain alone: a second campaign's N outcomes recorded with no publisher, then sent.
            led.create_campaign("later", "later", {}, None, "ab" * 32, "1.1.0+0")
            for t in ts:
                led.add_target("later", t, "all", "meter", device=t, via="conc", address="udp:127.0.0.9",
                               image_hash="ab" * 32, version="1.1.0+0")
                led.finish_device("later", t, "OK", "confirmed", final=True)
            before = len(con.ids())
            t2 = time.monotonic()
            sent = Publisher(st, parse_url(b.url("scale"))).flush()
            con.wait(lambda: len(con.ids()) >= before + n, timeout=600)
            dt = time.monotonic() - t2
            print(f"drain of a full outbox (events flush): {sent} messages ({n} outcomes + their campaign "
                  f"progress) acknowledged and all {n} outcomes at the consumer in {dt:.2f} s "
                  f"({n / dt:.0f} outcomes/s)")
            st.close()
        finally:
            con.close()
            cut.close()
            b.stop()
    return 0


def main() -> int:
    if "--workers" in sys.argv:
        return workers_main()
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("concentrators", type=int, nargs="?", default=10)
    ap.add_argument("meters", type=int, nargs="?", default=100)
    ap.add_argument("--publish", action="store_true", help="every outcome through a real Mosquitto")
    ap.add_argument("--outage", action="store_true", help="with --publish: the broker down for a third")
    ap.add_argument("--publisher-only", type=int, metavar="N", help="the publisher alone over N outcomes")
    a = ap.parse_args()
    if a.publisher_only:
        return publisher_only(a.publisher_only, a.outage)
    n, m = a.concentrators, a.meters
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
            broker = cut = con = None
            extra: list[str] = []
            if a.publish:
                from meterota.lab.broker import Mosquitto, TCPCut

                broker = Mosquitto(base / "broker").start()
                cut = TCPCut(broker.port)  # the head-end's link to the broker (cut with the outage)
                con = Consumer(broker.url("scale"))
                extra = ["--publish", f"mqtt://127.0.0.1:{cut.port}/scale", "--publish-wait", "120"]
            t1 = time.monotonic()
            w1 = time.time()
            proc = subprocess.Popen([str(BIN / "meterota"), "--db", str(db), "campaign", "run", str(plan),
                                     "--id", "scale", "--json", *extra], stdout=subprocess.PIPE,
                                    stderr=open(os.environ.get("SCALE_LOG", os.devnull), "w"))
            t_down = t_back = None
            if a.publish and a.outage:
                assert broker is not None and cut is not None and con is not None
                con.wait(lambda: len(con.ids()) >= n * m // 3)
                broker.kill()
                cut.cut()
                t_down = time.time()
                import sqlite3

                q = sqlite3.connect(str(db), timeout=30)
                while q.execute("SELECT COUNT(*) FROM outbox WHERE kind != 'campaign'").fetchone()[0] < 2 * n * m // 3:
                    if proc.poll() is not None:
                        break
                    time.sleep(0.5)  # polling the ledger's progress (a measurement tool, not a test)
                broker.start()
                con.wait(lambda: con.subscriptions >= 2)
                t_back = time.time()
                cut.restore()
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.monotonic() - t1
            assert proc.stdout is not None
            doc = json.loads(proc.stdout.read())
            if con is not None:
                print(outage_figures(db, con, t_back, t_down or w1))
        finally:
            if con is not None:
                con.close()
            if cut is not None:
                cut.close()
            if broker is not None:
                broker.stop()
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
