"""meterota.campaign.export over a real SQLite ledger: the CSV parses with the csv module,
the JSON round-trips, and the CIM EndDeviceEvents XML validates against the
shipped XSD, which in turn rejects documents that break the profile."""

from __future__ import annotations

import csv
import io
import json
import uuid
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
import xmlschema
from ledger_sample import CID, HASH, NASTY, NASTY_DEVICE, VERSION, Sample, build

from meterota.campaign import export as ex
from meterota.campaign.ledger import FINAL, Ledger
from meterota.store import Store

NS = {"m": ex.CIM_NS}


@pytest.fixture
def sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sample:
    return build(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(ex.schema_path()))


def epoch(s: str | None) -> float | None:
    return None if s is None else datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def test_csv_has_the_header_and_one_row_per_device(sample: Sample) -> None:
    text = ex.export_csv(sample.ledger, CID)
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert list(csv.reader(io.StringIO(text, newline="")))[0] == list(ex.FIELDS)
    assert len(rows) == len(sample.expect) == 13
    by = {r["target"]: r for r in rows}
    assert {t: r["result"] for t, r in by.items()} == sample.expect
    assert by[NASTY_DEVICE]["reason"] == NASTY                 # quoted, not mangled
    assert by["meter-0003"]["source"] == "field" and by["meter-0003"]["verified"] == "true"
    assert by["meter-0001"]["record"] == b"\x01\x02rec".hex() and by["meter-0001"]["mac"] == "aa" * 32
    assert by["meter-0010"]["finished"] == "" and by["meter-0010"]["attempts"] == "0"
    assert by["udp:127.0.0.2:1337"]["concentrator"] == "" and by["udp:127.0.0.2:1337"]["device"] == "nic-0101"
    assert by["meter-0004"]["fails_unreachable"] == "2" and by["meter-0004"]["attempts"] == "2"
    assert all(r["campaign"] == CID and r["image_hash"] == HASH for r in rows)


def test_json_round_trips_with_the_ledger_values(sample: Sample) -> None:
    doc = json.loads(ex.export_json(sample.ledger, CID))
    assert json.loads(json.dumps(doc)) == doc
    assert doc["format"] == ex.FORMAT and doc["format_version"] == 1
    c = doc["campaign"]
    assert (c["id"], c["version"], c["image_hash"], c["state"]) == (CID, VERSION, HASH, "done")
    assert c["name"] == 'Spring <rollout> & "co"' and c["finished"].endswith("Z")
    assert doc["counts"] == {"OK": 7, "KO": 1, "UNREACHABLE": 1, "ERROR": 1, "CANCELLED": 1, "pending": 1,
                             "running": 1}
    assert [d["target"] for d in doc["devices"]] == [r["target"] for r in sample.ledger.devices(CID)]
    for d in doc["devices"]:
        row = sample.ledger.device_row(CID, d["target"])
        assert row is not None
        assert set(d) == set(ex.FIELDS)
        assert d["result"] == sample.expect[d["target"]] == row["state"]
        assert (d["group"], d["concentrator"], d["kind"]) == (row["grp"], row["via"], row["kind"])
        for k in ("first_attempt", "last_attempt", "finished", "last_seen"):
            want = row[k]
            assert (epoch(d[k]) is None) == (want is None), k
            if want is not None:
                assert abs((epoch(d[k]) or 0) - want) < 0.001, k
        assert d["verified"] is bool(row["verified"])
        assert d["record"] == (row["record"].hex() if row["record"] is not None else None)
    nasty = next(d for d in doc["devices"] if d["target"] == NASTY_DEVICE)
    assert nasty["reason"] == NASTY
    wos = {w["device"]: w for w in doc["workorders"]}
    assert set(wos) == {"meter-0003", "meter-0004", "meter-0007", NASTY_DEVICE}
    assert wos["meter-0003"]["state"] == "closed" and wos["meter-0003"]["closed_by"] == 42
    assert wos["meter-0004"]["state"] == "open" and wos["meter-0004"]["result"] == "UNREACHABLE"


def test_cim_validates_and_maps_every_final_outcome(sample: Sample, schema: xmlschema.XMLSchema) -> None:
    text = ex.export_cim(sample.ledger, CID)
    schema.validate(text)
    root = ET.fromstring(text)
    assert root.tag == f"{{{ex.CIM_NS}}}EndDeviceEvents"
    events = root.findall("m:EndDeviceEvent", NS)
    final = {t: s for t, s in sample.expect.items() if s in FINAL}
    assert len(events) == len(final) == 11                   # pending and running have no event yet
    seen = {}
    for ev in events:
        details = {d.findtext("m:name", namespaces=NS): d.findtext("m:value", namespaces=NS)
                   for d in ev.findall("m:EndDeviceEventDetails", NS)}
        names = [n.findtext("m:name", namespaces=NS) for n in ev.findall("m:Assets/m:Names", NS)]
        target = names[0] if names else ev.findtext("m:Assets/m:mRID", namespaces=NS)
        assert target is not None
        row = sample.ledger.device_row(CID, target)
        assert row is not None, target
        assert ev.findtext("m:Assets/m:mRID", namespaces=NS) == row["device"]
        mrid = ev.findtext("m:mRID", namespaces=NS)
        assert mrid == str(uuid.uuid5(ex.MRID_NAMESPACE, f"{CID}/{target}"))
        assert ev.findtext("m:issuerTrackingID", namespaces=NS) == CID
        assert ev.findtext("m:reason", namespaces=NS) == row["reason"]
        created = ev.findtext("m:createdDateTime", namespaces=NS)
        assert created is not None and abs((epoch(created) or 0) - row["finished"]) < 0.001
        ref = ev.find("m:EndDeviceEventType", NS).get("ref")      # type: ignore[union-attr]
        assert ref == ex.event_type_code(final[target])
        assert details["result"] == final[target]
        assert details["toVersion"] == VERSION and details["imageHash"] == HASH
        assert details["concentrator"] == (row["via"] or "direct")
        assert details["attempts"] == str(row["attempts"])
        assert details["verified"] == ("true" if row["verified"] else "false")
        seen[target] = ref
    assert seen["meter-0003"] == "3.11.83.58" and seen[NASTY_DEVICE] == "3.11.83.85"
    assert seen["meter-0004"] == "3.11.83.7" and seen["meter-0007"] == "3.11.83.79"
    assert seen["meter-0009"] == "3.11.83.10"
    nasty = next(ev for ev in events if ev.findtext("m:Assets/m:mRID", namespaces=NS) == NASTY_DEVICE)
    assert nasty.findtext("m:reason", namespaces=NS) == NASTY
    types = {t.findtext("m:mRID", namespaces=NS): t for t in root.findall("m:EndDeviceEventType", NS)}
    assert set(types) == set(seen.values())
    assert types["3.11.83.58"].findtext("m:domain", namespaces=NS) == "Firmware"
    assert types["3.11.83.58"].findtext("m:eventOrAction", namespaces=NS) == "Succeeded"
    assert ex.export_cim(sample.ledger, CID) == text            # stable: same mRIDs every time


def _drop(path: str) -> Callable[[ET.Element], None]:
    def f(root: ET.Element) -> None:
        parent_path, _, leaf = path.rpartition("/")
        parent = root.find(parent_path, NS) if parent_path else root
        assert parent is not None
        child = parent.find(leaf, NS)
        assert child is not None
        parent.remove(child)
    return f


def _set(path: str, text: str) -> Callable[[ET.Element], None]:
    def f(root: ET.Element) -> None:
        e = root.find(path, NS)
        assert e is not None
        e.text = text
    return f


def _ref(code: str) -> Callable[[ET.Element], None]:
    def f(root: ET.Element) -> None:
        e = root.find("m:EndDeviceEvent/m:EndDeviceEventType", NS)
        assert e is not None
        e.set("ref", code)
    return f


@pytest.mark.parametrize("mutate", [
    _drop("m:EndDeviceEvent/m:createdDateTime"),         # a required element missing
    _drop("m:EndDeviceEvent/m:Assets"),
    _drop("m:EndDeviceEvent/m:EndDeviceEventType"),
    _set("m:EndDeviceEvent/m:createdDateTime", "2024-06-11T10:00:00+02:00"),  # not UTC
    _set("m:EndDeviceEvent/m:mRID", "not-a-uuid"),
    _set("m:EndDeviceEvent/m:EndDeviceEventDetails/m:name", "colour"),
    _ref("3.11.83"),                                      # not a 4-part code
    _ref("3.11.83.999"),                                  # a code the document does not define
], ids=["no-createdDateTime", "no-Assets", "no-type", "local-time", "bad-mrid", "bad-detail", "3-part",
        "undefined-code"])
def test_the_schema_rejects_documents_off_the_profile(sample: Sample, schema: xmlschema.XMLSchema,
                                                      mutate: Callable[[ET.Element], None]) -> None:
    root = ET.fromstring(ex.export_cim(sample.ledger, CID))
    mutate(root)
    assert not schema.is_valid(ET.tostring(root, encoding="unicode"))


def test_exports_of_an_empty_campaign_and_of_hostile_text(tmp_path: Path, schema: xmlschema.XMLSchema) -> None:
    led = Ledger(Store(tmp_path / "db"))
    led.create_campaign("empty", "nothing", {}, None, HASH, VERSION)
    assert ex.export_csv(led, "empty") == ",".join(ex.FIELDS) + "\r\n"
    assert json.loads(ex.export_json(led, "empty"))["devices"] == []
    schema.validate(ex.export_cim(led, "empty"))

    # characters XML cannot carry at all must not make the document unparsable
    led.create_campaign("ctl", "ctl", {}, None, HASH, VERSION)
    led.add_target("ctl", "m1", "g", "meter", device="m1", via="c1", address="a", image_hash=HASH, version=VERSION)
    led.finish_device("ctl", "m1", "KO", "bell\x07 nul\x00 tab\tok \ufffe end", final=True)
    text = ex.export_cim(led, "ctl")
    schema.validate(text)
    reason = ET.fromstring(text).findtext("m:EndDeviceEvent/m:reason", namespaces=NS)
    assert reason == "bell nul tab\tok  end"


@pytest.mark.parametrize("fn", [ex.export_csv, ex.export_json, ex.export_cim])
def test_an_unknown_campaign_is_a_usage_error(tmp_path: Path, fn: Callable[[Ledger, str], Any]) -> None:
    led = Ledger(Store(tmp_path / "db"))
    with pytest.raises(ex.UnknownCampaign) as ei:
        fn(led, "nope")
    assert ei.value.exit_code == 2


def test_export_dispatches_on_the_format_name(sample: Sample) -> None:
    assert ex.export(sample.ledger, CID, "csv") == ex.export_csv(sample.ledger, CID)
    assert ex.export(sample.ledger, CID, "xml") == ex.export_cim(sample.ledger, CID)
    with pytest.raises(ValueError):
        ex.export(sample.ledger, CID, "yaml")


def test_the_schema_ships_as_package_data() -> None:
    root = Path(__file__).resolve().parents[2]
    pyproject = (root / "pyproject.toml").read_text()
    assert '"campaign/schemas/*.xsd"' in pyproject
    assert ex.schema_path().is_file()
    assert ET.fromstring(ex.schema_path().read_text()).get("targetNamespace") == ex.CIM_NS
