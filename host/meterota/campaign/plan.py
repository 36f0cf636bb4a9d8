"""A campaign plan (PLAN.toml): the image, the targets in phased groups, and
the policy. Parsed and checked in full before anything is contacted; every
problem is one readable line (PlanError, exit code 2).

    [campaign]
    name = "feeder-12 spring upgrade"
    image = "fw-1.1.0.img"          # relative to the plan file
    priority = 5                    # concentrator job priority, 0-255
    concurrency = 4                 # direct devices and concentrators worked on at once
    device_timeout = 120            # seconds a direct device may take to come back after its reset
    duration = "6h"                 # after this, nothing new starts; pending devices end CANCELLED
    not_before = "2026-11-22T01:00:00Z"   # optional absolute window (ISO 8601 or epoch seconds)
    not_after = "2026-11-29T05:00:00Z"
    daily = "01:00-05:00"           # optional daily window, UTC; may wrap midnight
    retry_delay = 10                # seconds before a direct device is tried again

    [campaign.retries]              # further attempts per failure class
    unreachable = 2
    ko = 0
    error = 0

    [campaign.abort]                # stop the campaign when failures pile up
    threshold = 0.2                 # failed / finished
    min_finished = 10               # ... once this many devices finished
    count = ["KO", "ERROR"]         # the failure classes that count

    [[group]]
    name = "pilot"
    success_threshold = 0.9         # OK / devices of this group before the next group starts
    devices = ["/dev/ttyUSB0", "udp:10.0.0.7"]

    [[group.concentrators]]
    address = "udp:10.0.1.1"
    meters = "all"                  # or ["meter-0101", "meter-0102"]

    [publish]                       # optional: every outcome on an MQTT broker (docs/events.md)
    url = "mqtt://user:pass@broker.example:1883/utility/head-end"
    wait = 10                       # at the end, seconds to wait for the broker to take the rest
"""

from __future__ import annotations

import datetime as dt
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MeterotaError, EXIT_USAGE
from ..transport import canonical_address

FAILURE_CLASSES = ("UNREACHABLE", "KO", "ERROR")


class PlanError(MeterotaError):
    exit_code = EXIT_USAGE


@dataclass
class ConcentratorTarget:
    address: str
    meters: list[str] | None = None  # None: all its meters


@dataclass
class Group:
    name: str
    devices: list[str] = field(default_factory=list)
    concentrators: list[ConcentratorTarget] = field(default_factory=list)
    success_threshold: float = 0.0


@dataclass
class Abort:
    threshold: float = 1.01  # never
    min_finished: int = 1
    count: list[str] = field(default_factory=lambda: ["KO", "ERROR"])

    def tripped(self, failed: int, finished: int) -> bool:
        """Whether `failed` of `finished` devices stop the campaign. A share at
        or over the threshold does, once min_finished devices finished; it takes
        at least one failure, so a threshold of 0 means "any failure aborts"
        and successes alone never do."""
        return finished >= self.min_finished and failed > 0 and failed / finished >= self.threshold


@dataclass
class Plan:
    name: str
    image: str
    groups: list[Group]
    priority: int = 0
    concurrency: int = 4
    device_timeout: float = 60.0
    duration: float = 24 * 3600.0
    not_before: float | None = None
    not_after: float | None = None
    daily: tuple[int, int] | None = None  # minutes after midnight UTC: [open, close)
    retry_delay: float = 10.0
    retries: dict[str, int] = field(default_factory=lambda: {"UNREACHABLE": 2, "KO": 0, "ERROR": 0})
    abort: Abort = field(default_factory=Abort)
    publish: str | None = None  # broker URL of the event stream ([publish] url)
    publish_wait: float = 10.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Plan":
        groups = [Group(g["name"], list(g["devices"]), [ConcentratorTarget(**c) for c in g["concentrators"]],
                        float(g["success_threshold"])) for g in d["groups"]]
        rest = {k: v for k, v in d.items() if k not in ("groups", "abort", "daily")}
        return Plan(groups=groups, abort=Abort(**d["abort"]), daily=tuple(d["daily"]) if d["daily"] else None,
                    **rest)

    # -- time -----------------------------------------------------------------
    def window_state(self, now: float) -> tuple[bool, float | None]:
        """(open now, when it next opens or None if never again)."""
        if self.not_after is not None and now >= self.not_after:
            return False, None
        start = max(now, self.not_before or now)
        nxt = self._daily_open(start)
        if nxt is None:
            return False, None
        if self.not_after is not None and nxt >= self.not_after:
            return False, None
        return nxt <= now, nxt

    def window_close(self, now: float) -> float | None:
        """When the window that is open now closes (None: not before not_after)."""
        ends = [self.not_after] if self.not_after is not None else []
        if self.daily:
            day = _midnight(now)
            o, c = self.daily
            for base in (day - 86400, day):  # today's window, or yesterday's wrapping into today
                s = base + o * 60
                e = base + (c if c > o else c + 1440) * 60
                if s <= now < e:
                    ends.append(e)
        return min(ends) if ends else None

    def _daily_open(self, t: float) -> float | None:
        if not self.daily:
            return t
        o, c = self.daily
        day = _midnight(t)
        for base in (day - 86400, day, day + 86400):
            s = base + o * 60
            e = base + (c if c > o else c + 1440) * 60
            if t < e:
                return max(s, t)
        return None  # unreachable: tomorrow's window always ends after t


def _midnight(t: float) -> float:
    d = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc).timestamp()


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(v: Any, what: str) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        s = float(v)
    else:
        m = _DURATION.match(str(v)) if isinstance(v, str) else None
        if not m:
            raise PlanError(f"{what}: {v!r} is not a duration (e.g. 90, \"30m\", \"6h\", \"2d\")")
        s = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not math.isfinite(s) or s <= 0:
        raise PlanError(f"{what} must be a positive, finite number of seconds, not {v!r}")
    return s


def parse_time(v: Any, what: str) -> float:
    if isinstance(v, dt.datetime):
        return (v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)).timestamp()
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if not math.isfinite(v) or v < 0:
            raise PlanError(f"{what}: {v!r} is not a time (epoch seconds, or ISO 8601)")
        return float(v)
    if not isinstance(v, str):
        raise PlanError(f"{what}: {v!r} is not a time (ISO 8601 such as 2026-11-22T01:00:00Z, or epoch seconds)")
    try:
        d = dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        raise PlanError(f"{what}: {v!r} is not a time (ISO 8601 such as 2026-11-22T01:00:00Z, "
                        "or epoch seconds)") from None
    return (d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)).timestamp()


def _daily(v: Any) -> tuple[int, int]:
    m = re.match(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$", v) if isinstance(v, str) else None
    if not m:
        raise PlanError(f"campaign.daily: {v!r} is not a daily window like \"01:00-05:00\" (UTC)")
    if int(m[2]) > 59 or int(m[4]) > 59 or int(m[1]) > 23 or int(m[3]) > 24 or (int(m[3]) == 24 and int(m[4])):
        raise PlanError(f"campaign.daily: {v!r} is not a valid window (hours 00-23, minutes 00-59; "
                        "the end may be 24:00)")
    a, b = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if a >= 1440 or b > 1440 or a == b:
        raise PlanError(f"campaign.daily: {v!r} is not a valid window")
    return a, b


def _fraction(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise PlanError(f"{what} must be a fraction between 0 and 1, not {v!r}")
    return float(v)


def _int(v: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise PlanError(f"{what} must be a whole number from {lo} to {hi}, not {v!r}")
    return v


def _table(v: Any, where: str, example: str) -> dict[str, Any]:
    """A TOML table where one is expected: `abort = "yes"` says so, rather than
    failing on the characters of the string."""
    if not isinstance(v, dict):
        raise PlanError(f"{where} must be a table ({example}), not {v!r}")
    return v


def _known(d: dict[str, Any], keys: set[str], where: str) -> None:
    extra = sorted(set(d) - keys)
    if extra:
        raise PlanError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(keys))})")


def load(path: Path) -> Plan:
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise PlanError(f"cannot read plan {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise PlanError(f"{path}: not a TOML plan: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path}: not valid TOML: {e}") from None
    return parse(doc, base=path.resolve().parent)


def parse(doc: dict[str, Any], base: Path) -> Plan:
    _known(doc, {"campaign", "group", "publish"}, "plan")
    c = doc.get("campaign")
    if not isinstance(c, dict):
        raise PlanError("plan: a [campaign] table is required")
    if "group" in doc and not isinstance(doc["group"], list):
        raise PlanError(f"plan: groups are [[group]] tables, not group = {doc['group']!r}")
    _known(c, {"name", "image", "priority", "concurrency", "device_timeout", "duration", "not_before",
               "not_after", "daily", "retry_delay", "retries", "abort"}, "[campaign]")
    for k in ("name", "image"):
        if not isinstance(c.get(k), str) or not c[k]:
            raise PlanError(f"campaign.{k} is required")
    image = Path(c["image"])
    image = image if image.is_absolute() else base / image
    raw_groups = doc.get("group")
    if not isinstance(raw_groups, list) or not raw_groups:
        raise PlanError("plan: at least one [[group]] is required")
    groups: list[Group] = []
    seen_targets: dict[str, str] = {}
    seen_meters: dict[str, str] = {}
    for i, g in enumerate(raw_groups):
        where = f"group {i + 1}"
        _table(g, f"plan: each group", "[[group]] with name = \"...\"")
        _known(g, {"name", "devices", "concentrators", "success_threshold"}, where)
        name = g.get("name", f"group-{i + 1}")
        if not isinstance(name, str) or not name.strip():
            raise PlanError(f"{where}: name must be a non-empty string, not {name!r}")
        if any(x.name == name for x in groups):
            raise PlanError(f"{where}: the group name {name!r} is used twice")
        devices = g.get("devices", [])
        if not isinstance(devices, list) or not all(isinstance(x, str) and x for x in devices):
            raise PlanError(f"group {name}: devices must be a list of ports or udp:HOST addresses")
        concs = []
        raw_concs = g.get("concentrators", [])
        if not isinstance(raw_concs, list):
            raise PlanError(f"group {name}: concentrators must be [[group.concentrators]] tables, not {raw_concs!r}")
        for cc in raw_concs:
            if not isinstance(cc, dict) or not isinstance(cc.get("address"), str) or not cc["address"]:
                raise PlanError(f"group {name}: each concentrator needs an address")
            _known(cc, {"address", "meters"}, f"group {name} concentrator")
            meters = cc.get("meters", "all")
            if meters == "all":
                mlist = None
            elif isinstance(meters, list) and meters and all(isinstance(m, str) and m for m in meters):
                mlist = list(meters)
            else:
                raise PlanError(f"group {name}: concentrator {cc['address']}: meters must be \"all\" or a list of ids")
            for m in mlist or []:
                if m in seen_meters:
                    raise PlanError(f"group {name}: concentrator {cc['address']}: meter {m} is listed twice "
                                    f"(also under {seen_meters[m]})")
                seen_meters[m] = f"group {name}, concentrator {cc['address']}"
            concs.append(ConcentratorTarget(cc["address"], mlist))
        for t in devices + [x.address for x in concs]:
            same = canonical_address(t)  # one device named two ways is one target
            if same in seen_targets:
                raise PlanError(f"group {name}: {t} is already a target of this plan ({seen_targets[same]}: both "
                                f"are {same})")
            seen_targets[same] = t
        if not devices and not concs:
            raise PlanError(f"group {name}: no devices and no concentrators")
        groups.append(Group(name, list(devices), concs,
                            _fraction(g.get("success_threshold", 0.0), f"group {name}: success_threshold")))
    retries = {"UNREACHABLE": 2, "KO": 0, "ERROR": 0}
    r = _table(c.get("retries", {}), "campaign.retries", "[campaign.retries] with unreachable, ko, error")
    _known(r, {"unreachable", "ko", "error"}, "[campaign.retries]")
    for k, v in r.items():
        retries[k.upper()] = _int(v, f"campaign.retries.{k}", 0, 20)
    a = _table(c.get("abort", {}), "campaign.abort", "[campaign.abort] with threshold, min_finished, count")
    _known(a, {"threshold", "min_finished", "count"}, "[campaign.abort]")
    count = a.get("count", ["KO", "ERROR"])
    if not isinstance(count, list) or not all(str(x).upper() in FAILURE_CLASSES for x in count):
        raise PlanError(f"campaign.abort.count: a list of {', '.join(FAILURE_CLASSES)}")
    abort = Abort(_fraction(a["threshold"], "campaign.abort.threshold") if "threshold" in a else 1.01,
                  _int(a.get("min_finished", 1), "campaign.abort.min_finished", 1, 10**6),
                  [str(x).upper() for x in count])
    plan = Plan(
        name=c["name"], image=str(image), groups=groups,
        priority=_int(c.get("priority", 0), "campaign.priority", 0, 255),
        concurrency=_int(c.get("concurrency", 4), "campaign.concurrency", 1, 256),
        device_timeout=parse_duration(c.get("device_timeout", 60), "campaign.device_timeout"),
        duration=parse_duration(c.get("duration", "24h"), "campaign.duration"),
        not_before=parse_time(c["not_before"], "campaign.not_before") if "not_before" in c else None,
        not_after=parse_time(c["not_after"], "campaign.not_after") if "not_after" in c else None,
        daily=_daily(c["daily"]) if "daily" in c else None,
        retry_delay=parse_duration(c.get("retry_delay", 10), "campaign.retry_delay"),
        retries=retries, abort=abort)
    pub = doc.get("publish")
    if pub is not None:
        from ..events import BadURL, parse_url

        if not isinstance(pub, dict) or not isinstance(pub.get("url"), str):
            raise PlanError("[publish]: a url = \"mqtt://HOST/PREFIX\" is required")
        _known(pub, {"url", "wait"}, "[publish]")
        try:
            parse_url(pub["url"])
        except BadURL as e:
            raise PlanError(f"[publish] url: {e}") from None
        plan.publish = pub["url"]
        if "wait" in pub:
            plan.publish_wait = parse_duration(pub["wait"], "publish.wait")
    if plan.not_before and plan.not_after and plan.not_after <= plan.not_before:
        raise PlanError("campaign.not_after must be later than campaign.not_before")
    return plan
