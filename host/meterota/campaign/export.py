"""A campaign's results for other systems: CSV, JSON, and XML in the style of the
IEC 61968-9 EndDeviceEvents message. Pure functions over the ledger's rows
(ledger.py is the data contract); each returns the document as text and does no
I/O of its own. docs/exports.md describes the formats and the CIM mapping.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from importlib import resources
from typing import Any

from ..errors import EXIT_USAGE, MeterotaError
from .ledger import FINAL, Ledger

FORMAT = "meterota.campaign-export"
FORMAT_VERSION = 1

# Every state a campaign device can be in, in the order reports show them.
STATES = ("OK", "KO", "UNREACHABLE", "ERROR", "CANCELLED", "pending", "running")

# One row per device, the columns of the CSV and the keys of each JSON device object.
FIELDS = ("campaign", "target", "device", "group", "kind", "concentrator", "address", "from_version",
          "to_version", "image_hash", "result", "reason", "attempts", "fails_unreachable", "fails_ko",
          "fails_error", "first_attempt", "last_attempt", "finished", "last_seen", "verified", "source",
          "record", "mac")

# -- CIM --------------------------------------------------------------------------------------------
CIM_NS = "http://iec.ch/TC57/2011/EndDeviceEvents#"
ISSUER = "meterota"
# Namespace of the event mRIDs: uuid5(campaign id + "/" + target) under this one, so that
# exporting the same campaign twice gives the same mRIDs (a receiver can deduplicate).
MRID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:meterota:campaign-result")

# EndDeviceEventType codes, <EndDeviceType>.<EndDeviceDomain>.<EndDeviceSubdomain>.<EndDeviceEventOrAction>,
# with values from the enumerations of IEC 61968-9 Annex E. IEC's text is not freely available; the
# numbers were taken from the enumerations as implemented in the open-source Connexo head-end/MDM
# (Honeywell/Elster, com.elster.jupiter.cbo.EndDevice{Type,Domain,SubDomain,EventOrAction}, whose
# EndDeviceType cites "CIM Annex E, table E.1"): EndDeviceType 3 = ElectricMeter, Domain 11 = Firmware,
# SubDomain 83 = Program, EventOrAction 58 = Succeeded, 85 = Failed, 79 = Error, 7 = Attempted,
# 10 = Cancelled. 3.11.83.58 and 3.11.83.85 are also the codes Connexo itself emits for a completed
# and a failed meter firmware upgrade (com.energyict.cim.EndDeviceEventTypeFactory). The numbers are
# not checked against the IEC document itself; see docs/exports.md. UNREACHABLE has no dedicated code:
# "Attempted" (tried, not accomplished) is our choice, and the result detail carries the exact outcome.
END_DEVICE_TYPE = (3, "ElectricMeter")
DOMAIN = (11, "Firmware")
SUBDOMAIN = (83, "Program")
EVENT_OR_ACTION: dict[str, tuple[int, str]] = {
    "OK": (58, "Succeeded"),
    "KO": (85, "Failed"),
    "ERROR": (79, "Error"),
    "UNREACHABLE": (7, "Attempted"),
    "CANCELLED": (10, "Cancelled"),
}


def event_type_code(result: str) -> str:
    """The 4-part EndDeviceEventType code of a final result, e.g. 'OK' -> '3.11.83.58'."""
    return ".".join(str(n) for n in (END_DEVICE_TYPE[0], DOMAIN[0], SUBDOMAIN[0], EVENT_OR_ACTION[result][0]))


class UnknownCampaign(MeterotaError, LookupError):
    exit_code = EXIT_USAGE


def iso(t: float | None) -> str | None:
    """Epoch seconds -> ISO 8601 UTC with a Z (also a valid xs:dateTime); None stays None."""
    if t is None:
        return None
    return datetime.fromtimestamp(float(t), timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _hex(b: bytes | None) -> str | None:
    return bytes(b).hex() if b is not None else None


def campaign_row(ledger: Ledger, cid: str) -> dict[str, Any]:
    """The ledger's campaign row; UnknownCampaign if there is none."""
    c = ledger.campaign(cid)
    if c is None:
        raise UnknownCampaign(f"no campaign {cid!r} in {ledger.store.path}")
    return c


def campaign_header(ledger: Ledger, cid: str) -> dict[str, Any]:
    """The campaign's own row, JSON-ready (timestamps ISO 8601 UTC); UnknownCampaign if none."""
    c = campaign_row(ledger, cid)
    return {
        "id": c["id"], "name": c["name"], "state": c["state"], "reason": c["reason"],
        "version": c["version"], "image_hash": c["image_hash"], "plan_file": c["plan_file"],
        "phase": c["phase"], "created": iso(c["created"]), "finished": iso(c["finished"]),
    }


def device_rows(ledger: Ledger, cid: str) -> list[dict[str, Any]]:
    """One dict per campaign device with the keys of FIELDS, JSON-ready, ordered by group and target."""
    out = []
    for r in ledger.devices(cid):
        out.append({
            "campaign": cid, "target": r["target"], "device": r["device"], "group": r["grp"],
            "kind": r["kind"], "concentrator": r["via"], "address": r["address"],
            "from_version": r["from_version"], "to_version": r["to_version"], "image_hash": r["image_hash"],
            "result": r["state"], "reason": r["reason"], "attempts": int(r["attempts"]),
            "fails_unreachable": int(r["fails_unreachable"]), "fails_ko": int(r["fails_ko"]),
            "fails_error": int(r["fails_error"]),
            "first_attempt": iso(r["first_attempt"]), "last_attempt": iso(r["last_attempt"]),
            "finished": iso(r["finished"]), "last_seen": iso(r["last_seen"]),
            "verified": bool(r["verified"]), "source": r["source"],
            "record": _hex(r["record"]), "mac": _hex(r["mac"]),
        })
    return out


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Devices per state, every state of STATES present (0 when none)."""
    n = {s: 0 for s in STATES}
    for r in rows:
        n[r["result"]] = n.get(r["result"], 0) + 1
    return n


def workorder_rows(ledger: Ledger, cid: str) -> list[dict[str, Any]]:
    out = []
    for w in ledger.workorders(cid):
        out.append({
            "id": w["id"], "device": w["device"], "concentrator": w["concentrator"], "address": w["address"],
            "image_hash": w["image_hash"], "version": w["version"], "result": w["result"],
            "reason": w["reason"], "last_seen": iso(w["last_seen"]), "created": iso(w["created"]),
            "state": w["state"], "closed": iso(w["closed"]), "closed_by": w["closed_by"],
        })
    return out


# -- CSV / JSON ---------------------------------------------------------------------------------------
def export_csv(ledger: Ledger, cid: str) -> str:
    """Header line FIELDS, then one line per device (RFC 4180 quoting, CRLF line ends).
    Empty cells are missing values; verified is true/false; record and mac are hex."""
    rows = device_rows(ledger, cid)
    campaign_header(ledger, cid)  # UnknownCampaign for an unknown id, even with no devices
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\r\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("true" if v is True else "false" if v is False else "" if v is None else v)
                    for k, v in r.items()})
    return buf.getvalue()


def export_json(ledger: Ledger, cid: str) -> str:
    """{"format", "format_version", "campaign": {...}, "counts": {state: n}, "devices": [...],
    "workorders": [...]} with the device objects of device_rows()."""
    header = campaign_header(ledger, cid)
    rows = device_rows(ledger, cid)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "campaign": header, "counts": totals(rows),
           "devices": rows, "workorders": workorder_rows(ledger, cid)}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# -- CIM EndDeviceEvents ------------------------------------------------------------------------------
def event_mrid(cid: str, target: str) -> str:
    return str(uuid.uuid5(MRID_NAMESPACE, f"{cid}/{target}"))


_XML_BAD = dict.fromkeys(c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D))
_XML_BAD.update({0xFFFE: None, 0xFFFF: None})


def xml_text(s: str) -> str:
    """Drop the characters XML 1.0 cannot carry at all (C0 controls but tab/LF/CR, U+FFFE/F, lone
    surrogates): device-supplied reasons must not make the document unparsable."""
    s = s.translate(_XML_BAD)
    return "".join(ch for ch in s if not 0xD800 <= ord(ch) <= 0xDFFF)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    e = ET.SubElement(parent, f"{{{CIM_NS}}}{tag}", attrib)
    if text is not None:
        e.text = xml_text(text)
    return e


def export_cim(ledger: Ledger, cid: str) -> str:
    """An EndDeviceEvents document (namespace of the IEC 61968-9:2011 message profile) with one
    EndDeviceEvent per device that has a final result, followed by the EndDeviceEventType of each
    code used. Devices still pending or running have no event yet. Validates against
    schemas/end_device_events.xsd (schema_path())."""
    c = campaign_row(ledger, cid)
    rows = [r for r in ledger.devices(cid) if r["state"] in FINAL]
    return cim_document([(r, event_mrid(cid, r["target"])) for r in rows], c)


def cim_document(events: list[tuple[dict[str, Any], str]], c: dict[str, Any]) -> str:
    """EndDeviceEvents text for (ledger device row, mRID) pairs of campaign row `c` (keys id,
    created, version, image_hash). The one builder of the CIM XML: `export --format cim` and the
    per-outcome messages of the event stream (events.py) both use it."""
    ET.register_namespace("", CIM_NS)
    root = ET.Element(f"{{{CIM_NS}}}EndDeviceEvents")
    used: dict[str, str] = {}
    for r, mrid in events:
        result = r["state"]
        code = event_type_code(result)
        used[code] = result
        ev = _sub(root, "EndDeviceEvent")
        _sub(ev, "mRID", mrid)
        created = r["finished"] or r["last_attempt"] or r["first_attempt"]
        _sub(ev, "createdDateTime", iso(created if created is not None else c["created"]))
        _sub(ev, "issuerID", ISSUER)
        _sub(ev, "issuerTrackingID", c["id"])
        if r["reason"]:
            _sub(ev, "reason", str(r["reason"]))
        asset = _sub(ev, "Assets")
        _sub(asset, "mRID", r["device"] or r["target"])
        if r["device"] and r["target"] != r["device"]:
            name = _sub(asset, "Names")
            _sub(name, "name", r["target"])
            _sub(_sub(name, "NameType"), "name", "meterota.target")
        details: list[tuple[str, str | None]] = [
            ("result", result),
            ("fromVersion", r["from_version"]),
            ("toVersion", r["to_version"] or c["version"]),
            ("imageHash", r["image_hash"] or c["image_hash"]),
            ("attempts", str(int(r["attempts"]))),
            ("concentrator", r["via"] or "direct"),
            ("verified", "true" if r["verified"] else "false"),
            ("group", r["grp"]),
            ("source", r["source"]),
        ]
        for k, v in details:
            if v is None:
                continue
            d = _sub(ev, "EndDeviceEventDetails")
            _sub(d, "name", k)
            _sub(d, "value", str(v))
        _sub(ev, "EndDeviceEventType", ref=code)
    for code, result in sorted(used.items(), key=lambda kv: EVENT_OR_ACTION[kv[1]][0]):
        t = _sub(root, "EndDeviceEventType")
        _sub(t, "mRID", code)
        _sub(t, "domain", DOMAIN[1])
        _sub(t, "eventOrAction", EVENT_OR_ACTION[result][1])
        _sub(t, "subDomain", SUBDOMAIN[1])
        _sub(t, "type", END_DEVICE_TYPE[1])
        _sub(_sub(t, "Names"), "name", f"meterota upgrade result {result}")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def schema_path() -> Any:
    """The XSD of export_cim's profile, shipped as package data (a Traversable; str() it for a path)."""
    return resources.files("meterota.campaign") / "schemas" / "end_device_events.xsd"


def export(ledger: Ledger, cid: str, fmt: str) -> str:
    """fmt: csv | json | cim (also accepted: xml)."""
    fn = {"csv": export_csv, "json": export_json, "cim": export_cim, "xml": export_cim}.get(fmt)
    if fn is None:
        raise ValueError(f"unknown export format {fmt!r} (csv, json, cim)")
    return fn(ledger, cid)
