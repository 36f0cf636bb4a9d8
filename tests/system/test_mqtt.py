"""The event stream on a real Mosquitto broker (Debian's package, `make mosquitto`),
started here on free loopback ports with its own configuration file: every
outcome published as it is recorded, and nothing lost or reordered per device
through an unreachable broker, refused credentials, a TLS failure, a broker
killed and restarted, a network cut and a killed host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import pytest
import xmlschema

from conftest import BIN, REPO, Images, hil_mode, port_of, run_cli
from meterota.campaign import export as ex
from meterota.campaign.ledger import Ledger
from meterota.campaign.plan import ConcentratorTarget, Group, Plan
from meterota.events import BrokerURL, parse_url
from meterota.lab.broker import MOSQUITTO, Mosquitto, TCPCut, free_port
from meterota.lab.sim import SimDevice
from meterota.publish import Publisher, connect
from meterota.store import Store

HASH = "cd" * 32


@pytest.fixture(autouse=True)
def _needs_mosquitto(request: pytest.FixtureRequest) -> None:
    if hil_mode(request.config):
        pytest.skip("needs the simulator")
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed: run `make mosquitto` (Debian's package)")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as b:
        yield b


@pytest.fixture(scope="module")
def schema() -> Any:
    doc = json.loads((REPO / "docs" / "events.schema.json").read_text())
    cls = jsonschema.validators.validator_for(doc)
    return cls(doc, format_checker=cls.FORMAT_CHECKER)


@pytest.fixture(scope="module")
def xsd() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(ex.schema_path()))


class Collector:
    """A consumer on its own paho client: every message as received (repeats included), with
    its MQTT properties; waits are on a condition, never on the clock."""

    def __init__(self, url: str):
        self.url = parse_url(url)
        self.got: list[dict[str, Any]] = []
        self.subscriptions = 0
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.wait(lambda: self.subscriptions >= 1)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        props = dict(getattr(msg.properties, "UserProperty", []) or []) if msg.properties else {}
        with self._cv:
            self.got.append({"topic": msg.topic, "doc": json.loads(msg.payload), "retain": bool(msg.retain),
                             "props": props})
            self._cv.notify_all()

    def _run(self) -> None:
        from meterota.publish import PublishError

        while not self._stop.is_set():
            try:
                c, state = connect(self.url, f"collector-{id(self)}", on_message=self._on_message)
            except PublishError:
                self._stop.wait(0.2)  # the broker is down: the test restarts it
                continue

            def suback(*_a: Any) -> None:
                with self._cv:
                    self.subscriptions += 1
                    self._cv.notify_all()

            c.on_subscribe = suback
            c.subscribe([(self.url.topic("devices/+/upgrade"), 1), (self.url.topic("campaigns/+"), 1)])
            while not self._stop.is_set() and state["connected"]:
                c.loop(0.1)
            c.disconnect()

    def wait(self, pred: Callable[[], bool], timeout: float = 60.0) -> None:
        with self._cv:
            assert self._cv.wait_for(pred, timeout), f"not reached in {timeout} s; got {len(self.got)} messages"

    def devices(self) -> list[dict[str, Any]]:
        with self._cv:
            return [g["doc"] for g in self.got if g["doc"]["type"] != "campaign"]

    def first_seen(self) -> list[dict[str, Any]]:
        """De-duplicated by id, in order of first arrival (what a consumer keeps)."""
        seen: set[str] = set()
        out = []
        for d in self.devices():
            if d["id"] not in seen:
                seen.add(d["id"])
                out.append(d)
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def collect() -> Iterator[Callable[[str], Collector]]:
    made: list[Collector] = []

    def make(url: str) -> Collector:
        c = Collector(url)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def outbox(db: Path | str) -> list[dict[str, Any]]:
    with Store(db) as st:
        return st.db.rows("SELECT * FROM outbox ORDER BY id")


def device_order(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Message ids per device topic, in the outbox's order (the order a device's messages must keep)."""
    out: dict[str, list[str]] = {}
    for r in rows:
        if r["kind"] != "campaign":
            out.setdefault(r["topic"], []).append(r["msg_id"])
    return out


def received_order(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    from meterota.events import device_topic

    out: dict[str, list[str]] = {}
    for d in docs:
        out.setdefault(device_topic(d["device"]), []).append(d["id"])
    return out


def assert_all_in_order(db: Path | str, col: Collector, pub: Publisher | None = None) -> dict[str, int]:
    """Every device message of the outbox received, once each after de-duplication, in each
    device's order; the outbox empty (once `pub` has its last PUBACKs). Returns delivery counts."""
    want = device_order(outbox(db))
    n = sum(len(v) for v in want.values())
    col.wait(lambda: len({d["id"] for d in col.devices()}) >= n)
    if pub is not None:
        assert pub.close(30) == 0
    rows = outbox(db)
    firsts = col.first_seen()
    assert received_order(firsts) == want
    assert all(r["sent"] is not None for r in rows), "rows left unsent"
    return {"messages": n, "deliveries": len(col.devices()), "duplicates": len(col.devices()) - n, "lost": 0}


def register(db: Path, devs: list[SimDevice]) -> None:
    with Store(db) as st:
        for d in devs:
            st.set_key(d.device_id, d.key)


def warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("meterota: warning:")]


# -- a field upgrade, live and into the legacy drop folder ----------------------------------------
def test_an_upgrade_is_published_and_dropped_as_cim_once(make_device: Callable[..., SimDevice], images: Images,
                                                         broker: Mosquitto, collect: Callable[[str], Collector],
                                                         tmp_path: Path, schema: Any, xsd: Any) -> None:
    dev = make_device("udp")
    db = tmp_path / "db"
    register(db, [dev])
    col = collect(broker.url("he"))
    drop = tmp_path / "drop"
    sub = subprocess.Popen([str(BIN / "meterota"), "events", "--subscribe", broker.url("he"), "--format", "cim",
                            "--to-dir", str(drop), "--count", "1", "--timeout", "120"],
                           stderr=subprocess.PIPE, text=True)
    assert sub.stderr is not None
    assert "subscribed to he/devices/+/upgrade" in sub.stderr.readline()  # it is listening: now publish
    p = run_cli("meterota", "--db", str(db), "--json", "upgrade", *port_of(dev), str(images.app("1.1.0")),
                "--publish", broker.url("he"))
    assert p.returncode == 0, p.stderr
    assert not warnings(p.stderr)
    assert sub.wait(60) == 0
    (f,) = [x for x in drop.iterdir() if not x.name.startswith(".")]
    xsd.validate(f.read_text())
    col.wait(lambda: len(col.devices()) == 1)
    (m,) = [g for g in col.got if g["doc"]["type"] == "upgrade"]
    d = m["doc"]
    schema.validate(d)
    assert m["topic"] == f"he/devices/{dev.device_id}/upgrade" and not m["retain"]
    assert m["props"] == {"message-id": d["id"]}  # MQTT v5 user property = the payload's id
    assert d["result"] == "OK" and d["verified"] and d["from_version"] == "1.0.0+0" and d["to_version"] == "1.1.0+0"
    assert f.name.endswith(f"-{dev.device_id}-{d['id']}.xml") and f.read_text() == d["cim"]
    doc = json.loads(p.stdout)
    assert d["record"] == doc["confirmation"]["record"] and d["mac"] == doc["confirmation"]["mac"]
    # The same message again (a redelivery after an outage): the drop folder keeps one file.
    with Store(db) as st, st.transaction():
        st.db.execute("UPDATE outbox SET sent=NULL")
    sub2 = subprocess.Popen([str(BIN / "meterota"), "events", "--subscribe", broker.url("he"), "--format", "cim",
                             "--to-dir", str(drop), "--timeout", "120"], stderr=subprocess.PIPE, text=True)
    assert sub2.stderr is not None and "subscribed" in sub2.stderr.readline()
    assert run_cli("meterota", "--db", str(db), "events", "flush", "--publish", broker.url("he")).returncode == 0
    col.wait(lambda: len(col.devices()) == 2)  # delivered twice, same id ...
    sub2.send_signal(signal.SIGTERM)
    assert sub2.wait(30) == 0
    assert len([x for x in drop.iterdir() if not x.name.startswith(".")]) == 1  # ... written once


# -- a campaign, every outcome as it happens ----------------------------------------------------------
def test_a_campaign_publishes_every_outcome_and_its_progress(images: Images, broker: Mosquitto,
                                                             collect: Callable[[str], Collector], tmp_path: Path,
                                                             schema: Any, xsd: Any) -> None:
    from meterota.lab.fleet import Fleet, FleetOptions, meter_id

    fleet = Fleet(tmp_path / "fleet", 1, 3, FleetOptions(unreachable={meter_id(1, 3)}, meter_reset_s=4))
    fleet.start()
    try:
        direct = SimDevice(tmp_path / "d1", device_id="direct-1", transport="udp")
        direct.start()
        try:
            db = tmp_path / "db"
            register(db, fleet.meters + fleet.concentrators + [direct])
            plan = tmp_path / "plan.toml"
            plan.write_text(f'[campaign]\nname = "mqtt"\nimage = "{images.app("1.1.0")}"\nretry_delay = 1\n'
                            'concurrency = 2\n[campaign.retries]\nunreachable = 0\n'
                            f'[[group]]\nname = "all"\ndevices = ["{direct.address}"]\n'
                            f'[[group.concentrators]]\naddress = "{fleet.concentrators[0].address}"\n'
                            f'[publish]\nurl = "{broker.url("he/east")}"\n')
            col = collect(broker.url("he/east"))
            p = run_cli("meterota", "--db", str(db), "campaign", "run", str(plan), "--id", "c1", "--json", timeout=300)
            assert p.returncode == 5, p.stderr  # done, with a failure (the unreachable meter)
            assert not warnings(p.stderr)
            # The same job's results read again (job results --publish): recorded once, so published once.
            with Store(db) as st:
                (job,) = Ledger(st).jobs("c1")
            before = len(outbox(db))
            j = run_cli("meterota", "--db", str(db), "job", "results", *port_of(fleet.concentrators[0]),
                        str(job["job"]), "--publish", broker.url("he/east"))
            assert j.returncode == 3, j.stderr  # one meter unreachable
            assert len(outbox(db)) == before
            # A new job outside the campaign: what it newly records is published (the two meters on the
            # image already keep their standing records, recorded before).
            j = run_cli("meterota", "--db", str(db), "job", "create", *port_of(fleet.concentrators[0]),
                        str(images.app("1.1.0")), "--job-retries", "0", "--wait", "--publish", broker.url("he/east"))
            assert j.returncode == 3, j.stderr
        finally:
            direct.stop()
    finally:
        fleet.stop()
    stats = assert_all_in_order(db, col)
    assert stats["duplicates"] == 0
    docs = col.first_seen()
    for d in docs:
        schema.validate(d)
        if d.get("cim"):
            xsd.validate(d["cim"])
    rec = [d for d in docs if d["campaign"] is None]
    assert [(d["device"], d["result"], d["verified"], d["source"]) for d in rec] == [
        (meter_id(1, 3), "UNREACHABLE", False, "field")]
    docs = [d for d in docs if d["campaign"] is not None]
    final = {d["device"]: d["result"] for d in docs if d["type"] == "upgrade" and d["final"]}
    assert final == {"direct-1": "OK", meter_id(1, 1): "OK", meter_id(1, 2): "OK", meter_id(1, 3): "UNREACHABLE"}
    assert all(d["campaign"] == "c1" for d in docs)
    lost = [d for d in docs if d["device"] == meter_id(1, 3)]
    assert [(d["type"], d.get("state")) for d in lost] == [("upgrade", None), ("workorder", "open")]
    # A consumer that comes later still learns where the campaign stands: the retained progress.
    late = collect(broker.url("he/east"))
    late.wait(lambda: any(g["doc"]["type"] == "campaign" for g in late.got))
    (prog,) = [g for g in late.got if g["doc"]["type"] == "campaign"]
    schema.validate(prog["doc"])
    assert prog["retain"] and prog["topic"] == "he/east/campaigns/c1"
    assert prog["doc"]["state"] == "done" and prog["doc"]["counts"] == {"OK": 3, "UNREACHABLE": 1}


# -- faults at the command line: one warning, the work goes on, the outbox catches up --------------------
@pytest.mark.parametrize("fault", ["unreachable", "credentials", "tls"])
def test_a_broker_fault_is_one_warning_and_the_outbox_catches_up(
        fault: str, make_device: Callable[..., SimDevice], images: Images, collect: Callable[[str], Collector],
        tmp_path: Path) -> None:
    users = {"head-end": "s3cret"} if fault == "credentials" else None
    b = Mosquitto(tmp_path / "broker", users=users, tls=fault == "tls").start()
    try:
        good = {"unreachable": b.url("he"), "credentials": b.url("he", user="head-end:s3cret"),
                "tls": b.url("he", tls=True, query=f"ca={b.cert}")}[fault]
        bad, reason = {
            "unreachable": (f"mqtt://127.0.0.1:{free_port()}/he", "broker unreachable (connection refused)"),
            "credentials": (b.url("he", user="head-end:wrong"), "broker refused the connection: Not authorized"),
            "tls": (b.url("he", tls=True), "TLS failure: certificate verify failed"),  # no CA for its self-signed cert
        }[fault]
        dev = make_device("udp")
        db = tmp_path / "db"
        register(db, [dev])
        p = run_cli("meterota", "--db", str(db), "upgrade", *port_of(dev), str(images.app("1.1.0")),
                    "--publish", bad, "--publish-wait", "2")
        assert p.returncode == 0, p.stderr  # the upgrade itself went on and succeeded
        w = warnings(p.stderr)
        assert len([x for x in w if reason in x]) == 1, p.stderr  # said once, readably
        assert "s3cret" not in p.stderr and "wrong" not in p.stderr
        assert [x for x in w if "1 messages not yet sent" in x and "events flush" in x]
        assert [r["sent"] for r in outbox(db)] == [None]
        f = run_cli("meterota", "--db", str(db), "events", "flush", "--publish", bad)
        assert f.returncode == 3 and reason in f.stderr and len(f.stderr.strip().splitlines()) == 1
        col = collect(good)
        f = run_cli("meterota", "--db", str(db), "events", "flush", "--publish", good)
        assert f.returncode == 0, f.stderr
        assert "1 messages sent" in f.stdout
        assert_all_in_order(db, col)
    finally:
        b.stop()


# -- the publisher through outages, at the library level over the real ledger --------------------------
class Writer:
    """Outcomes recorded through the real ledger, as a campaign's runner records them:
    devices retried (final=False) before their final result, in bursts."""

    def __init__(self, db: Path | str, devices: int):
        self.st = Store(db)
        self.st.enable_outbox()
        self.led = Ledger(self.st)
        self.targets = [f"meter-{i:04d}" for i in range(devices)]
        plan = Plan("outage", "/nonexistent.img", [Group("g", [], [ConcentratorTarget("udp:127.0.0.9",
                                                                                     self.targets)])])
        self.led.create_campaign("c1", "outage", plan.as_dict(), None, HASH, "1.1.0+0")
        for t in self.targets:
            self.led.add_target("c1", t, "g", "meter", device=t, via="conc-1", address="udp:127.0.0.9",
                                image_hash=HASH, version="1.1.0+0")
        self.warned: list[str] = []
        self.noted: list[str] = []

    def burst(self, final: bool) -> None:
        for t in self.targets:
            if final:
                self.led.finish_device("c1", t, "OK", "confirmed", final=True)
            else:
                self.led.finish_device("c1", t, "UNREACHABLE", "silent", final=False)

    def publisher(self, url: str) -> Publisher:
        return Publisher(self.st, parse_url(url), warn=self.warned.append, note=self.noted.append).start()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_broker_killed_and_restarted_mid_campaign(protocol: str, tmp_path: Path,
                                                  collect: Callable[[str], Collector]) -> None:
    b = Mosquitto(tmp_path / "broker").start()
    cut = TCPCut(b.port)  # the head-end reaches the broker through this link
    try:
        col = collect(b.url("he", query=f"protocol={protocol}"))
        w = Writer(tmp_path / "db", 20)
        pub = w.publisher(f"mqtt://127.0.0.1:{cut.port}/he?protocol={protocol}")
        w.burst(final=False)
        col.wait(lambda: len(col.devices()) == 20)
        # The broker acknowledged the burst (PUBACKs in, rows marked sent) before it dies: a window
        # still in flight at a crash is sent again by design (at least once, same ids), which is
        # not what this test counts.
        assert pub.wait_drained(60)
        b.kill()
        cut.cut()
        w.burst(final=False)  # the campaign goes on while the broker is down
        w.led.finish_device("c1", w.targets[0], "KO", "reverted", final=True)
        b.start()  # same port; the consumer reconnects and subscribes again
        col.wait(lambda: col.subscriptions >= 2)
        cut.restore()
        for t in w.targets[1:]:
            w.led.finish_device("c1", t, "OK", "confirmed", final=True)
        stats = assert_all_in_order(tmp_path / "db", col, pub)
        assert stats["messages"] == 60 and stats["duplicates"] == 0
        assert len(w.warned) == 1 and "he" in w.warned[0] and "outbox" in w.warned[0], w.warned
        assert any("connected again" in n for n in w.noted)
    finally:
        cut.close()
        b.stop()


@pytest.mark.pg_core
def test_network_cut_in_flight_loses_and_reorders_nothing(db_target: str, broker: Mosquitto,
                                                          collect: Callable[[str], Collector]) -> None:
    """On both backends: the outbox is a table of the records database, SQLite or PostgreSQL."""
    cut = TCPCut(broker.port)
    try:
        col = collect(broker.url("he"))
        w = Writer(db_target, 100)
        pub = w.publisher(f"mqtt://127.0.0.1:{cut.port}/he")

        def campaign() -> None:
            for _ in range(3):
                w.burst(final=False)
            w.burst(final=True)

        writer = threading.Thread(target=campaign)
        writer.start()
        col.wait(lambda: len(col.devices()) >= 50)
        cut.cut()  # mid-stream, while outcomes are still being recorded: what was in flight is lost
        cut.restore()
        writer.join()
        stats = assert_all_in_order(db_target, col, pub)
        assert stats["messages"] == 400
        assert cut.cuts >= 1 and len(w.warned) <= 1  # at most one warning for the one outage
    finally:
        cut.close()


HOST = """
import sys, time
sys.path.insert(0, {host!r})
from pathlib import Path
from meterota.store import Store
from meterota.campaign.ledger import Ledger
from meterota.campaign.plan import ConcentratorTarget, Group, Plan
from meterota.events import parse_url
from meterota.publish import Publisher
st = Store(Path({db!r})); st.enable_outbox(); led = Ledger(st)
led.create_campaign("c1", "kill", {{}}, None, {hash!r}, "1.1.0+0")
ts = [f"meter-{{i:04d}}" for i in range(50)]
for t in ts:
    led.add_target("c1", t, "g", "meter", device=t, via="c", address="udp:127.0.0.9", image_hash={hash!r},
                   version="1.1.0+0")
Publisher(st, parse_url({url!r})).start()
while True:  # outcomes until killed
    for t in ts:
        led.finish_device("c1", t, "UNREACHABLE", "silent", final=False)
"""


def test_a_killed_host_delays_but_loses_nothing(tmp_path: Path, broker: Mosquitto,
                                                collect: Callable[[str], Collector]) -> None:
    col = collect(broker.url("he"))
    db = tmp_path / "db"
    proc = subprocess.Popen([sys.executable, "-c", HOST.format(host=str(REPO / "host"), db=str(db), hash=HASH,
                                                                url=broker.url("he"))])
    try:
        col.wait(lambda: len(col.devices()) >= 200)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: rows written, some sent, some in flight
        proc.wait()
    left = sum(r["sent"] is None for r in outbox(db))
    assert left > 0  # the host died with messages still to send
    f = run_cli("meterota", "--db", str(db), "events", "flush", "--publish", broker.url("he"))
    assert f.returncode == 0, f.stderr
    stats = assert_all_in_order(db, col)
    assert stats["messages"] >= 200


def test_an_abort_with_no_campaign_process_publishes_the_cancelled_devices(
        tmp_path: Path, broker: Mosquitto, collect: Callable[[str], Collector], schema: Any) -> None:
    db = tmp_path / "db"
    w = Writer(db, 3)
    w.st.close()
    col = collect(broker.url("he"))
    p = run_cli("meterota", "--db", str(db), "campaign", "abort", "c1", "--publish", broker.url("he"))
    assert p.returncode == 0, p.stderr
    assert_all_in_order(db, col)
    docs = col.first_seen()
    assert sorted((d["device"], d["result"], d["final"]) for d in docs) == [
        (t, "CANCELLED", True) for t in w.targets]
    for d in docs:
        schema.validate(d)


@pytest.mark.pg_core
def test_publishers_of_several_workers_drain_the_outbox_one_at_a_time(
        db_target: str, broker: Mosquitto, collect: Callable[[str], Collector]) -> None:
    """Workers sharing a records database each run a publisher: the drain lease makes one of
    them send the whole outbox (no message twice), and another takes over when it stops."""
    col = collect(broker.url("he"))
    w = Writer(db_target, 50)
    other = Store(db_target)  # a second worker's own connection
    other.enable_outbox()
    a = w.publisher(broker.url("he"))
    b_noted: list[str] = []
    b = Publisher(other, parse_url(broker.url("he")), note=b_noted.append).start()
    w.burst(final=False)
    col.wait(lambda: len(col.devices()) >= 50)
    first, second = (a, b) if a.sent else (b, a)  # whichever took the lease first sent it all
    assert second.sent == 0
    assert first.close(30) == 0  # it hands the lease back ...
    w.burst(final=True)          # ... and the other sends what comes next
    stats = assert_all_in_order(db_target, col, second)
    assert stats["messages"] == 100 and stats["duplicates"] == 0
    assert second.sent > 0
    other.close()


def test_a_campaign_rides_out_a_broker_killed_and_restarted(images: Images, tmp_path: Path,
                                                             collect: Callable[[str], Collector]) -> None:
    """The real campaign CLI: the broker dies after the first outcome, the campaign goes on
    (one warning), the broker comes back, the outbox catches up before the process ends."""
    from meterota.lab.fleet import Fleet, FleetOptions

    b = Mosquitto(tmp_path / "broker").start()
    cut = TCPCut(b.port)
    fleet = Fleet(tmp_path / "fleet", 1, 3, FleetOptions(meter_reset_s=4))
    direct = SimDevice(tmp_path / "d1", device_id="direct-1", transport="udp")
    proc = None
    try:
        fleet.start()
        direct.start()
        db = tmp_path / "db"
        register(db, fleet.meters + fleet.concentrators + [direct])
        plan = tmp_path / "plan.toml"
        plan.write_text(f'[campaign]\nname = "restart"\nimage = "{images.app("1.1.0")}"\nconcurrency = 2\n'
                        f'[[group]]\nname = "all"\ndevices = ["{direct.address}"]\n'
                        f'[[group.concentrators]]\naddress = "{fleet.concentrators[0].address}"\n')
        col = collect(b.url("he"))
        proc = subprocess.Popen([str(BIN / "meterota"), "--db", str(db), "campaign", "run", str(plan), "--id", "c1",
                                 "--json", "--publish", f"mqtt://127.0.0.1:{cut.port}/he", "--publish-wait", "120"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        warned = threading.Event()

        def read() -> None:
            assert proc is not None and proc.stderr is not None
            for ln in proc.stderr:
                lines.append(ln)
                if ln.startswith("meterota: warning:"):
                    warned.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        col.wait(lambda: len(col.devices()) >= 1, timeout=120)
        b.kill()
        cut.cut()
        assert warned.wait(120), "".join(lines)  # an outcome recorded while the broker is down
        b.start()
        col.wait(lambda: col.subscriptions >= 2)
        cut.restore()
        assert proc.wait(300) == 0, "".join(lines)
        reader.join()
        assert len([ln for ln in lines if ln.startswith("meterota: warning:")]) == 1, "".join(lines)
        assert json.loads(proc.stdout.read())["counts"] == {"OK": 4}  # type: ignore[union-attr]
        stats = assert_all_in_order(db, col)
        assert stats["messages"] == 4
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        direct.stop()
        fleet.stop()
        cut.close()
        b.stop()


@pytest.mark.pg_core
def test_a_worker_publishes_the_outcomes_it_records(db_target: str, make_device: Callable[..., SimDevice],
                                                     images: Images, tmp_path: Path, broker: Mosquitto,
                                                     collect: Callable[[str], Collector]) -> None:
    """`campaign worker --publish`. (Not with `--campaign ID`: issue13's worker then never sees
    itself idle, so --until-idle would not return.)"""
    from meterota.campaign.plan import load
    from meterota.campaign.runner import create

    devs = [make_device("udp", name=f"w-{i}") for i in range(2)]
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[campaign]\nname = "w"\nimage = "{images.app("1.1.0")}"\n[[group]]\nname = "g"\n'
                    f'devices = {json.dumps([d.address for d in devs])}\n')
    with Store(db_target) as st:
        for d in devs:
            st.set_key(d.device_id, d.key)
        create(Ledger(st), load(plan), str(plan), "w1")
    col = collect(broker.url("he"))
    p = run_cli("meterota", "--db", db_target, "campaign", "worker", "--until-idle", "--publish", broker.url("he"),
                timeout=300)
    assert p.returncode == 0, p.stderr
    assert not warnings(p.stderr)
    assert_all_in_order(db_target, col)
    assert sorted((d["device"], d["result"], d["verified"]) for d in col.first_seen()) == [
        ("w-0", "OK", True), ("w-1", "OK", True)]
