"""The event stream without a broker: broker URLs, the outbox written in the
outcome's own transaction, and every message against the checked-in JSON
Schema (docs/events.schema.json) and its CIM document against the export XSD."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xmlschema

from conftest import REPO, run_cli
from meterota import events
from meterota.campaign import export as ex
from meterota.campaign.ledger import Ledger
from meterota.events import BadURL, parse_url
from meterota.store import Outcome, Store

HASH = "ab" * 32


@pytest.fixture(scope="module")
def schema() -> jsonschema.protocols.Validator:
    doc = json.loads((REPO / "docs" / "events.schema.json").read_text())
    cls = jsonschema.validators.validator_for(doc)
    cls.check_schema(doc)
    return cls(doc, format_checker=cls.FORMAT_CHECKER)


@pytest.fixture(scope="module")
def xsd() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(ex.schema_path()))


def campaign(target: str, n: int = 3, *, outbox: bool = True) -> tuple[Store, Ledger]:
    st = Store(target)
    if outbox:
        st.enable_outbox()
    led = Ledger(st)
    led.create_campaign("c1", "spring", {}, None, HASH, "1.1.0+0")
    for i in range(n):
        led.add_target("c1", f"meter-{i}", "g1", "meter", device=f"meter-{i}", via="conc-1", address="udp:127.0.0.9",
                       image_hash=HASH, version="1.1.0+0")
    led.add_target("c1", "/dev/pts/7", "g1", "direct", address="/dev/pts/7", image_hash=HASH, version="1.1.0+0")
    return st, led


def payloads(st: Store) -> list[dict[str, Any]]:
    return [dict(json.loads(r["payload"]), _topic=r["topic"], _retain=r["retain"])
            for r in st.db.rows("SELECT * FROM outbox ORDER BY id")]


@pytest.mark.parametrize("url, want", [
    ("mqtt://127.0.0.1/utility/he", ("mqtt", "127.0.0.1", 1883, "utility/he", None, None)),
    ("mqtts://u:p%40ss@localhost:8884/x?ca=/tmp/ca.pem", ("mqtts", "localhost", 8884, "x", "u", "p@ss")),
    ("mqtt://broker:1884", ("mqtt", "broker", 1884, "meterota", None, None)),
])
def test_broker_urls(url: str, want: tuple[Any, ...]) -> None:
    u = parse_url(url)
    assert (u.scheme, u.host, u.port, u.prefix, u.username, u.password) == want
    assert "p@ss" not in u.safe() and "p%40ss" not in u.safe()


@pytest.mark.parametrize("url", ["http://h/x", "mqtt:///x", "mqtt://h:99999/x", "mqtt://h/a/+/b", "mqtt://h/a#",
                                 "mqtt://h/x?qos=2", "mqtt://h/x?ca=f", "mqtt://h/x?protocol=4", "h:1883/x"])
def test_bad_broker_urls_are_refused(url: str) -> None:
    with pytest.raises(BadURL):
        parse_url(url)


@pytest.mark.parametrize("argv", [
    ["upgrade", "--port", "/nonexistent", "img.bin", "--publish", "http://127.0.0.1/x"],
    ["campaign", "run", "plan.toml", "--publish", "mqtt://127.0.0.1:0x/p"],
    ["job", "results", "--udp", "127.0.0.9", "1", "--publish", "tcp://127.0.0.1/x"],
    ["events", "--subscribe", "mqtt://127.0.0.1/a/#"],
    ["events", "flush", "--publish", "mqtt:/nohost"],
])
def test_an_invalid_url_is_a_usage_error(argv: list[str], tmp_path: Path) -> None:
    p = run_cli("meterota", "--db", str(tmp_path / "db"), *argv)
    assert p.returncode == 2, p.stderr
    assert "broker URL" in p.stderr or "prefix" in p.stderr or "no broker host" in p.stderr or "option" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_plan_publish_table_is_checked(tmp_path: Path) -> None:
    from meterota.campaign import plan as pl

    base = '[campaign]\nname = "x"\nimage = "i.bin"\n[[group]]\nname = "g"\ndevices = ["udp:127.0.0.5"]\n'
    ok = pl.parse(pl.tomllib.loads(base + '[publish]\nurl = "mqtt://127.0.0.1:1884/he"\nwait = "30s"\n'), tmp_path)
    assert ok.publish == "mqtt://127.0.0.1:1884/he" and ok.publish_wait == 30
    for bad in ('[publish]\nurl = "mqtt://h/a/#"\n', '[publish]\nwait = 3\n', '[publish]\nurl = "mqtt://h/x"\nqos = 2\n'):
        with pytest.raises(pl.PlanError):
            pl.parse(pl.tomllib.loads(base + bad), tmp_path)
    (tmp_path / "plan.toml").write_text(base + '[publish]\nurl = "ftp://h/x"\n')
    p = run_cli("meterota", "--db", str(tmp_path / "db"), "campaign", "run", str(tmp_path / "plan.toml"))
    assert p.returncode == 2 and "[publish] url" in p.stderr


@pytest.mark.pg_core
def test_every_outcome_is_a_message_in_its_own_transaction(db_target: str, schema: Any, xsd: Any) -> None:
    st, led = campaign(db_target)
    led.start_attempt("c1", "meter-0", "g1", via="conc-1")
    led.finish_device("c1", "meter-0", "OK", "confirmed", final=True, from_version="1.0.0+0", record=b"\xa1",
                      mac=b"\x01" * 32, verified=True)
    led.finish_device("c1", "meter-1", "UNREACHABLE", "silent", final=False)          # will retry
    led.finish_device("c1", "meter-1", "UNREACHABLE", "never tried", final=False, count=False)  # no outcome
    led.finish_device("c1", "meter-1", "KO", "reverted: boot failed", final=True)
    led.finish_device("c1", "/dev/pts/7", "ERROR", "bad record", final=True)
    led.finish_device("c1", "meter-2", "CANCELLED", "not upgraded: campaign aborted", final=True, count=False)
    led.open_workorder("c1", led.device_row("c1", "meter-1"), "1.1.0+0")
    assert not led.open_workorder("c1", led.device_row("c1", "meter-1"), "1.1.0+0")  # once
    led.close_workorders("meter-1", HASH, 7)
    led.set_campaign("c1", state="done", reason="")
    docs = payloads(st)
    for d in docs:
        schema.validate({k: v for k, v in d.items() if not k.startswith("_")})
        if d.get("cim"):
            xsd.validate(d["cim"])
            assert ex.ET.fromstring(d["cim"]).find(f"{{{ex.CIM_NS}}}EndDeviceEvent/{{{ex.CIM_NS}}}mRID").text == d["id"]
    dev = [(d["device"], d["type"], d.get("result"), d.get("final"), d.get("state")) for d in docs
           if d["type"] != "campaign"]
    assert dev == [("meter-0", "upgrade", "OK", True, None), ("meter-1", "upgrade", "UNREACHABLE", False, None),
                   ("meter-1", "upgrade", "KO", True, None), ("/dev/pts/7", "upgrade", "ERROR", True, None),
                   ("meter-2", "upgrade", "CANCELLED", True, None), ("meter-1", "workorder", "KO", None, "open"),
                   ("meter-1", "workorder", "KO", None, "closed")]
    topics = {d["device"]: d["_topic"] for d in docs if d["type"] != "campaign"}
    assert topics["meter-0"] == "devices/meter-0/upgrade"
    assert topics["/dev/pts/7"] == "devices/%2Fdev%2Fpts%2F7/upgrade"  # one topic level, no wildcard
    progress = [d for d in docs if d["type"] == "campaign"]
    assert all(d["_topic"] == "campaigns/c1" and d["_retain"] for d in progress)
    assert progress[-1]["state"] == "done" and progress[-1]["counts"] == {"OK": 1, "KO": 1, "ERROR": 1,
                                                                          "CANCELLED": 1}
    ok = docs[0]
    assert ok["record"] == "a1" and ok["mac"] == "01" * 32 and ok["verified"] and ok["from_version"] == "1.0.0+0"
    assert len({d["id"] for d in docs}) == len(docs)


@pytest.mark.pg_core
def test_an_outcome_and_its_message_commit_together(db_target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while queueing the message rolls the outcome back too: never one without the other."""
    st, led = campaign(db_target)

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("disk full")

    monkeypatch.setattr(events, "campaign_outcome", broken)
    with pytest.raises(RuntimeError):
        led.finish_device("c1", "meter-0", "OK", "confirmed", final=True)
    assert led.device_row("c1", "meter-0")["state"] == "pending"
    assert not [e for e in led.events("c1") if e["kind"] == "result"]
    assert st.outbox_counts() == {"sent": 0, "unsent": 0}
    monkeypatch.undo()
    led.finish_device("c1", "meter-0", "OK", "confirmed", final=True)
    assert led.device_row("c1", "meter-0")["state"] == "OK" and st.outbox_counts()["unsent"] == 2


def test_upgrade_records_outside_campaigns_are_messages(db_target: str, schema: Any, xsd: Any) -> None:
    st = Store(db_target)
    st.enable_outbox()
    o = Outcome("meter-9", "udp:127.0.0.9", "1.0.0+0", "1.1.0+0", HASH, "KO", "reverted: boot failed", 1, 1.0e9,
                1.0e9 + 5)
    rid = st.add(o)
    st.add(Outcome(**{**o.__dict__, "campaign": "c1"}))  # its campaign's ledger publishes that one
    st.add(Outcome(**{**o.__dict__, "campaign": "c1"}), publish=True)  # job results --campaign: no ledger
    docs = payloads(st)
    assert len(docs) == 2
    d = docs[0]
    schema.validate({k: v for k, v in d.items() if not k.startswith("_")})
    xsd.validate(d["cim"])
    assert d["record_id"] == rid and d["campaign"] is None and d["result"] == "KO" and d["source"] == "field"
    assert d["t"] == "2001-09-09T01:46:45.000Z" and d["_topic"] == "devices/meter-9/upgrade"


def test_no_outbox_without_a_publisher(tmp_path: Path) -> None:
    st, led = campaign(str(tmp_path / "db"), outbox=False)
    led.finish_device("c1", "meter-0", "OK", "confirmed", final=True)
    st.add(Outcome("meter-9", "x", None, "1.1.0", HASH, "KO", "r", 1, 1.0, 2.0))
    assert st.outbox_counts() == {"sent": 0, "unsent": 0}


def test_an_older_records_database_gains_the_outbox(tmp_path: Path) -> None:
    """A records file of store schema 2 (before the event stream) is migrated forward, its rows kept."""
    from meterota import store as store_mod
    from meterota.db import Database

    db = Database(tmp_path / "db")
    db.migrate("store", store_mod.MIGRATIONS[:2])
    db.run(lambda: db.execute("INSERT INTO devices(id, key) VALUES(?, ?)", ("meter-1", b"k" * 32)))
    db.close()
    with Store(tmp_path / "db") as st:
        assert st.db.schema_version("store") == len(store_mod.MIGRATIONS) == 3
        assert st.key("meter-1") == b"k" * 32 and st.outbox_counts() == {"sent": 0, "unsent": 0}
