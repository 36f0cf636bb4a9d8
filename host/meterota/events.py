"""The event stream's model: broker URLs and the messages one recorded outcome
becomes. Pure functions, no I/O: store.py and campaign/ledger.py call the
builders inside the transaction that records the outcome (the outbox), and
publish.py sends what they built. docs/events.md is the reference and
docs/events.schema.json the JSON Schema of every payload.

Topics are relative to the URL's PREFIX:
    devices/<ID>/upgrade   one per device: outcomes and work orders, QoS 1, in order
    campaigns/<ID>         a campaign's progress, QoS 1, retained (the newest wins)
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .errors import EXIT_USAGE, MeterotaError

SCHEMA = "meterota.event/1"
DEFAULT_PREFIX = "meterota"
MQTT_PORT = 1883
MQTTS_PORT = 8883


class BadURL(MeterotaError, ValueError):
    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class BrokerURL:
    """mqtt://[user:pass@]host[:port]/PREFIX[?ca=FILE&protocol=5|3.1.1&client_id=ID]
    (mqtts:// for TLS; `ca` is the CA bundle that signs the broker's certificate)."""
    scheme: str
    host: str
    port: int
    prefix: str
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    protocol: str = "5"
    client_id: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def safe(self) -> str:
        """The URL without its password, for messages."""
        user = f"{self.username}@" if self.username else ""
        return f"{self.scheme}://{user}{self.host}:{self.port}/{self.prefix}"

    def topic(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"


def parse_url(text: str) -> BrokerURL:
    """A broker URL, or BadURL (a usage error, exit 2) saying what is wrong."""
    try:
        u = urlsplit(text)
        port = u.port
    except ValueError as e:
        raise BadURL(f"{text!r} is not a broker URL: {e}") from None
    if u.scheme not in ("mqtt", "mqtts"):
        raise BadURL(f"{text!r} is not a broker URL: use mqtt://[user:pass@]host[:port]/PREFIX (or mqtts://)")
    if not u.hostname:
        raise BadURL(f"{text!r}: no broker host")
    if "#" in text:
        raise BadURL(f"{text!r}: the topic prefix may not hold '+', '#' or empty levels")
    prefix = unquote(u.path.strip("/")) or DEFAULT_PREFIX
    if any(c in prefix for c in "+#\0") or "//" in prefix:
        raise BadURL(f"{text!r}: the topic prefix {prefix!r} may not hold '+', '#' or empty levels")
    q = parse_qs(u.query, keep_blank_values=True)
    unknown = sorted(set(q) - {"ca", "protocol", "client_id"})
    if unknown:
        raise BadURL(f"{text!r}: unknown option {unknown[0]!r} (known: ca, protocol, client_id)")
    protocol = q.get("protocol", ["5"])[-1]
    if protocol not in ("5", "3.1.1"):
        raise BadURL(f"{text!r}: protocol must be 5 or 3.1.1, not {protocol!r}")
    ca = q.get("ca", [None])[-1]
    if ca and u.scheme != "mqtts":
        raise BadURL(f"{text!r}: ca= is for mqtts:// URLs")
    return BrokerURL(u.scheme, u.hostname, port or (MQTTS_PORT if u.scheme == "mqtts" else MQTT_PORT), prefix,
                     unquote(u.username) if u.username else None, unquote(u.password) if u.password else None,
                     ca, protocol, q.get("client_id", [None])[-1])


def url_arg(text: str) -> BrokerURL:
    """argparse type= for --publish / --subscribe: a bad URL is argparse's usage error (exit 2)."""
    import argparse

    try:
        return parse_url(text)
    except BadURL as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- messages ------------------------------------------------------------------------------------
@dataclass
class Message:
    """One outbox row: a topic relative to the prefix and a JSON payload holding its own id."""
    msg_id: str
    topic: str
    kind: str  # upgrade | workorder | campaign
    retain: bool
    payload: str  # JSON text


def device_topic(device: str) -> str:
    # An id with '/', '+', '#' (a direct target's port path, say) stays one topic level.
    return f"devices/{quote(device, safe='-_.:@~,=')}/upgrade"


def campaign_topic(cid: str) -> str:
    return f"campaigns/{quote(cid, safe='-_.:@~,=')}"


def _iso(t: float | None) -> str | None:
    from .campaign.export import iso

    return iso(t)


def _hex(b: bytes | None) -> str | None:
    return bytes(b).hex() if b is not None else None


def _message(kind: str, topic: str, body: dict[str, Any], retain: bool = False,
             cim: tuple[dict[str, Any], dict[str, Any]] | None = None) -> Message:
    """The id is made once, here, and stays with the row: every (re)delivery carries it. With
    `cim` (ledger-style device row, campaign row) the payload carries the outcome as an
    EndDeviceEvents document whose event mRID is the message id."""
    mid = str(uuid.uuid4())
    doc = {"schema": SCHEMA, "id": mid, "type": kind, **body}
    if cim is not None:
        doc["cim"] = _cim(cim[0], cim[1], mid)
    return Message(mid, topic, kind, retain, json.dumps(doc, sort_keys=True, ensure_ascii=False))


def _cim(row: dict[str, Any], campaign: dict[str, Any], mrid: str) -> str:
    from .campaign.export import cim_document

    return cim_document([(row, mrid)], campaign)


def campaign_outcome(c: dict[str, Any], row: dict[str, Any], *, final: bool, result: str, t: float) -> Message:
    """A campaign device's outcome as the ledger has just written it (`row` is its updated
    campaign_devices row; a retry has state 'pending' and `result` its class)."""
    device = row["device"] or row["target"]
    cim_row = dict(row, state=result, finished=t if final else row["finished"], last_attempt=row["last_attempt"] or t)
    body = {
        "t": _iso(t), "device": device, "target": row["target"], "campaign": c["id"], "group": row["grp"],
        "concentrator": row["via"], "address": row["address"], "result": result, "final": final,
        "reason": row["reason"] or "", "from_version": row["from_version"], "to_version": row["to_version"],
        "image_hash": row["image_hash"], "attempts": int(row["attempts"]), "verified": bool(row["verified"]),
        "source": row["source"], "record": _hex(row["record"]), "mac": _hex(row["mac"]),
    }
    return _message("upgrade", device_topic(device), body, cim=(cim_row, c))


def record_outcome(o: Any, record_id: int, source: str = "field") -> Message:
    """An upgrade outcome recorded outside any campaign ledger (store.Outcome)."""
    body = {
        "t": _iso(o.finished), "device": o.device, "target": o.device, "campaign": o.campaign, "group": None,
        "concentrator": None, "address": o.address, "result": o.result, "final": True, "reason": o.reason or "",
        "from_version": o.from_version, "to_version": o.to_version, "image_hash": o.image_hash,
        "attempts": int(o.attempts), "verified": bool(o.verified), "source": source,
        "record": _hex(o.record), "mac": _hex(o.mac), "record_id": record_id,
    }
    row = {"state": o.result, "target": o.device, "device": o.device, "via": None, "reason": o.reason,
           "from_version": o.from_version, "to_version": o.to_version, "image_hash": o.image_hash,
           "attempts": o.attempts, "verified": o.verified, "grp": None, "source": source,
           "finished": o.finished, "last_attempt": o.started, "first_attempt": o.started}
    c = {"id": o.campaign or f"upgrade-{record_id}", "created": o.started, "version": o.to_version,
         "image_hash": o.image_hash}
    return _message("upgrade", device_topic(o.device), body, cim=(row, c))


def workorder(w: dict[str, Any], state: str, t: float | None = None) -> Message:
    """A work order opened or closed (`w` a workorders row, before or after the change)."""
    body = {
        "t": _iso(t or time.time()), "device": w["device"], "campaign": w["campaign"], "workorder": int(w["id"]),
        "state": state, "result": w["result"], "reason": w["reason"] or "", "concentrator": w["concentrator"],
        "address": w["address"], "to_version": w["version"], "image_hash": w["image_hash"],
        "last_seen": _iso(w["last_seen"]), "closed_by": w.get("closed_by"),
    }
    return _message("workorder", device_topic(w["device"]), body)


def progress(c: dict[str, Any], counts: dict[str, int], t: float | None = None) -> Message:
    """A campaign's state and counts per state; retained on campaigns/<ID>."""
    total = sum(counts.values())
    done = sum(counts.get(s, 0) for s in ("OK", "KO", "UNREACHABLE", "ERROR", "CANCELLED"))
    body = {"t": _iso(t or time.time()), "campaign": c["id"], "name": c["name"], "state": c["state"],
            "reason": c["reason"] or "", "version": c["version"], "image_hash": c["image_hash"],
            "counts": {k: int(v) for k, v in sorted(counts.items())}, "total": total, "done": done}
    return _message("campaign", campaign_topic(c["id"]), body, retain=True)
