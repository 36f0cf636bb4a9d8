"""PLAN.toml parsing and the time-window arithmetic (pure host code)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from conftest import run_cli
from meterota.campaign.plan import Plan, PlanError, load, parse


def utc(*a: int) -> float:
    return dt.datetime(*a, tzinfo=dt.timezone.utc).timestamp()


def plan_of(**campaign: object) -> Plan:
    doc = {"campaign": {"name": "n", "image": "fw.img", **campaign},
           "group": [{"name": "g", "devices": ["udp:10.0.0.1"]}]}
    return parse(doc, Path("/plans"))


def test_full_plan(tmp_path: Path) -> None:
    (tmp_path / "plan.toml").write_text("""
[campaign]
name = "feeder 12"
image = "fw.img"
priority = 7
concurrency = 8
device_timeout = "2m"
duration = "6h"
not_before = 2026-11-22T01:00:00Z
not_after = "2026-11-29T05:00:00Z"
daily = "22:00-05:00"
[campaign.retries]
unreachable = 3
ko = 1
[campaign.abort]
threshold = 0.1
min_finished = 20
count = ["KO", "UNREACHABLE"]
[[group]]
name = "pilot"
success_threshold = 0.95
devices = ["/dev/ttyUSB0", "udp:10.0.0.7"]
[[group]]
name = "all"
[[group.concentrators]]
address = "udp:10.0.1.1"
[[group.concentrators]]
address = "udp:10.0.1.2"
meters = ["meter-0201"]
""")
    p = load(tmp_path / "plan.toml")
    assert p.image == str(tmp_path / "fw.img")
    assert (p.priority, p.concurrency, p.device_timeout, p.duration) == (7, 8, 120.0, 21600.0)
    assert p.not_before == utc(2026, 11, 22, 1) and p.not_after == utc(2026, 11, 29, 5)
    assert p.daily == (22 * 60, 5 * 60)
    assert p.retries == {"UNREACHABLE": 3, "KO": 1, "ERROR": 0}
    assert (p.abort.threshold, p.abort.min_finished, p.abort.count) == (0.1, 20, ["KO", "UNREACHABLE"])
    assert [g.name for g in p.groups] == ["pilot", "all"] and p.groups[0].success_threshold == 0.95
    assert p.groups[1].concentrators[0].meters is None and p.groups[1].concentrators[1].meters == ["meter-0201"]
    # What the ledger keeps is enough to rebuild the plan on resume.
    assert Plan.from_dict(p.as_dict()) == p


@pytest.mark.parametrize("campaign, message", [
    ({"concurrency": 0}, "campaign.concurrency must be a whole number from 1 to 256"),
    ({"duration": "soon"}, "is not a duration"),
    ({"daily": "25:00-03:00"}, "is not a valid window"),
    ({"not_before": "tomorrow"}, "is not a time"),
    ({"not_before": 200, "not_after": 100}, "not_after must be later"),
    ({"retries": {"sometimes": 1}}, "unknown key 'sometimes'"),
    ({"abort": {"threshold": 2}}, "must be a fraction"),
    ({"colour": "red"}, "unknown key 'colour'"),
])
def test_plan_errors_are_one_line(campaign: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan_of(**campaign)


def test_group_errors() -> None:
    base = {"campaign": {"name": "n", "image": "fw.img"}}
    with pytest.raises(PlanError, match="at least one"):
        parse(base, Path("/"))
    with pytest.raises(PlanError, match="no devices and no concentrators"):
        parse({**base, "group": [{"name": "g"}]}, Path("/"))
    with pytest.raises(PlanError, match="already a target"):
        parse({**base, "group": [{"name": "a", "devices": ["x"]}, {"name": "b", "devices": ["x"]}]}, Path("/"))
    with pytest.raises(PlanError, match="meters must be"):
        parse({**base, "group": [{"name": "a", "concentrators": [{"address": "c", "meters": "some"}]}]}, Path("/"))


def test_daily_window_wrapping_midnight() -> None:
    p = plan_of(daily="22:00-05:00")
    assert p.window_state(utc(2026, 11, 21, 23, 30)) == (True, utc(2026, 11, 21, 23, 30))
    assert p.window_state(utc(2026, 11, 21, 3)) == (True, utc(2026, 11, 21, 3))
    assert p.window_state(utc(2026, 11, 21, 12)) == (False, utc(2026, 11, 21, 22))
    assert p.window_close(utc(2026, 11, 21, 23)) == utc(2026, 11, 22, 5)
    assert p.window_close(utc(2026, 11, 21, 3)) == utc(2026, 11, 21, 5)


def test_absolute_and_daily_windows_combine() -> None:
    p = plan_of(daily="01:00-02:00", not_before=utc(2026, 11, 22, 1, 30), not_after=utc(2026, 11, 23, 1, 30))
    now = utc(2026, 11, 21, 12)
    assert p.window_state(now) == (False, utc(2026, 11, 22, 1, 30))
    assert p.window_close(utc(2026, 11, 23, 1, 10)) == utc(2026, 11, 23, 1, 30)  # not_after comes first
    assert p.window_state(utc(2026, 11, 22, 3)) == (False, utc(2026, 11, 23, 1))
    assert p.window_state(utc(2026, 11, 23, 1, 30)) == (False, None)  # never again


def test_cli_reports_a_bad_plan_in_one_line(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text("[campaign]\nname = 'x'\nimage = 'x.img'\n[[group]]\nname = 'g'\ndevices = ['udp:127.0.0.1']\n")
    p = run_cli("meterota", "--db", str(tmp_path / "db"), "campaign", "run", str(plan))
    assert p.returncode == 8  # the image file is missing: the same code as `upgrade missing.bin`
    assert p.stderr.strip().count("\n") == 0 and "cannot read the plan's image" in p.stderr
    plan.write_text("[campaign\n")
    p = run_cli("meterota", "--db", str(tmp_path / "db"), "campaign", "run", str(plan))
    assert p.returncode == 2 and "not valid TOML" in p.stderr and p.stderr.strip().count("\n") == 0
    p = run_cli("meterota", "--db", str(tmp_path / "db"), "campaign", "status", "nope")
    assert p.returncode == 2 and p.stderr.strip() == f"meterota: error: no campaign nope in {tmp_path / 'db'}"
