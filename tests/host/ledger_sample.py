"""A campaign ledger with a bit of everything, written through Ledger's own
methods into a real SQLite file, for the export and report tests: three groups,
two concentrators and direct devices, every result, a retry, work orders (one
closed by a field upgrade), and a device-supplied reason meant to break markup."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meterota.campaign import ledger as ledger_mod
from meterota.campaign.ledger import Ledger
from meterota.store import Store

CID = "c-20240611-1"
HASH = "ab" * 32
VERSION = "1.2.0"
T0 = 1718100000.0  # 2024-06-11 10:00:00 UTC
NASTY = ('flash write failed <script>document.body.dataset.pwned="1"</script> "&\' '
         '<img src=x onerror="document.body.dataset.pwned=2">]]><!--')
NASTY_DEVICE = "meter-<b>13</b>"
# direct devices: known by their address until the first attempt tells their id
DIRECT_IDS = {"udp:127.0.0.2:1337": "nic-0101", "/dev/pts/3": "nic-0102", "udp:127.0.0.9:1337": "nic-0109"}


class Clock:
    """Stands in for the ledger's time module: every call moves 7 s on."""

    def __init__(self, t: float) -> None:
        self.t = t

    def time(self) -> float:
        self.t += 7.0
        return self.t


@dataclass
class Sample:
    ledger: Ledger
    cid: str
    expect: dict[str, str] = field(default_factory=dict)   # target -> final state
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    vias: dict[str, dict[str, int]] = field(default_factory=dict)


def build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sample:
    clock = Clock(T0)
    monkeypatch.setattr(ledger_mod, "time", clock)
    led = Ledger(Store(tmp_path / "db"))
    led.create_campaign(CID, 'Spring <rollout> & "co"', {"groups": []}, "plans/spring.toml", HASH, VERSION)
    s = Sample(led, CID)

    # (target, group, kind, via, device, result); results are applied in this order
    plan: list[tuple[str, str, str, str | None, str | None, str]] = [
        ("udp:127.0.0.2:1337", "canary", "direct", None, None, "OK"),
        ("/dev/pts/3", "canary", "direct", None, None, "OK"),
        ("meter-0001", "wave-1", "meter", "conc-A", "meter-0001", "OK"),
        ("meter-0002", "wave-1", "meter", "conc-A", "meter-0002", "OK"),
        ("meter-0003", "wave-1", "meter", "conc-A", "meter-0003", "KO"),
        ("meter-0004", "wave-1", "meter", "conc-A", "meter-0004", "UNREACHABLE"),
        ("meter-0005", "wave-1", "meter", "conc-B", "meter-0005", "OK"),
        ("meter-0006", "wave-2", "meter", "conc-B", "meter-0006", "OK"),
        ("meter-0007", "wave-2", "meter", "conc-B", "meter-0007", "ERROR"),
        (NASTY_DEVICE, "wave-2", "meter", "conc-B", NASTY_DEVICE, "KO"),
        ("meter-0009", "wave-2", "meter", "conc-B", "meter-0009", "CANCELLED"),
        ("udp:127.0.0.9:1337", "wave-2", "direct", None, None, "running"),
        ("meter-0010", "wave-2", "meter", "conc-B", "meter-0010", "pending"),
    ]
    for target, grp, kind, via, dev, _ in plan:
        addr = "udp:10.0.0.1:1337" if via == "conc-A" else "udp:10.0.0.2:1337" if via else target
        assert led.add_target(CID, target, grp, kind, device=dev, via=via, address=addr, image_hash=HASH,
                              version=VERSION)
    led.put_job(CID, "udp:10.0.0.1:1337", 0, 17, "collected")
    led.put_job(CID, "udp:10.0.0.2:1337", 0, 4, "collected")
    led.put_job(CID, "udp:10.0.0.2:1337", 1, 5, "running")

    reasons = {"OK": "confirmed", "KO": "reverted: self-test failed", "UNREACHABLE": "no answer after 3 tries",
               "ERROR": "protocol: bad CBOR", "CANCELLED": "campaign cancelled"}
    for target, grp, kind, via, dev, result in plan:
        if result == "pending":
            continue
        led.start_attempt(CID, target, grp, via)
        if result == "running":
            continue
        if result == "UNREACHABLE":  # one retry first
            led.finish_device(CID, target, "UNREACHABLE", "timeout", final=False)
            led.start_attempt(CID, target, grp, via)
        reason = NASTY if target == NASTY_DEVICE else reasons[result]
        ok = result == "OK"
        led.finish_device(CID, target, result, reason, final=True, device=dev or DIRECT_IDS[target],
                          from_version="1.1.0", record=b"\x01\x02rec" if ok else None,
                          mac=b"\xaa" * 32 if ok else None, verified=ok, last_seen=clock.time())
        if result in ("KO", "UNREACHABLE", "ERROR"):
            row = led.device_row(CID, target)
            assert row is not None and led.open_workorder(CID, row, VERSION)

    # meter-0003 (KO) was fixed in the field: a verified field upgrade closes its work order
    led.finish_device(CID, "meter-0003", "OK", "field upgrade", final=True, source="field", record=b"\x03field",
                      mac=b"\xbb" * 32, verified=True)
    led.event(CID, "field", target="meter-0003", grp="wave-1", via="conc-A", result="OK", reason="field upgrade")
    assert len(led.close_workorders("meter-0003", HASH, 42)) == 1
    led.set_campaign(CID, state="done", reason="all groups done", finished=clock.time())

    for target, grp, _, via, _, result in plan:
        final = "OK" if target == "meter-0003" else result
        s.expect[target] = final
        s.groups.setdefault(grp, {}).setdefault(final, 0)
        s.groups[grp][final] += 1
        s.vias.setdefault(via or "direct", {}).setdefault(final, 0)
        s.vias[via or "direct"][final] += 1
    return s


def merged(counts: dict[str, int]) -> dict[str, int]:
    """The report's view: running shown as pending, states with no devices left out."""
    out: dict[str, int] = {}
    for k, v in counts.items():
        k = "pending" if k == "running" else k
        out[k] = out.get(k, 0) + v
    return {k: v for k, v in out.items() if v}


def rows_by(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {r[key]: r for r in rows}
