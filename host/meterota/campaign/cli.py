"""The campaign commands of the CLI: campaign run|resume|worker|status|list|abort,
workorders, export, report. Thin: the work is in campaign.py, ledger.py,
export.py and report.py."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import threading
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .. import argtypes as at
from .. import errors
from .ledger import Ledger
from ..store import Store

STATES = ("OK", "KO", "UNREACHABLE", "ERROR", "CANCELLED", "running", "pending")


@contextmanager
def _ledger(args: argparse.Namespace, campaign: str | None = None) -> Iterator[tuple[Store, Ledger]]:
    """The records database and its ledger; with `campaign`, one that must exist
    (an unknown campaign is a bad command line, exit 2, for every command)."""
    from ..cli import open_store

    with open_store(args.db) as st:
        led = Ledger(st)
        if campaign is not None and led.campaign(campaign) is None:
            raise errors.UsageError(f"no campaign {campaign} in {st.path}")
        yield st, led


def lease_default() -> float:
    """--lease's default: $METEROTA_LEASE_S, else 15 s."""
    try:
        return max(1.0, float(os.environ.get("METEROTA_LEASE_S", "15")))
    except ValueError:
        return 15.0


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


class Progress:
    """Counts per group and per concentrator, refreshed from the ledger: a
    rich live table on a terminal, a plain line whenever a count changes
    otherwise, nothing with --json."""

    def __init__(self, ledger: Ledger, cid: str, quiet: bool):
        self.ledger = ledger
        self.cid = cid
        self.quiet = quiet
        self.tty = sys.stderr.isatty() and not quiet
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = ""
        self._live: Any = None
        self._print = threading.Lock()  # worker threads report steps concurrently

    def step(self, text: str) -> None:
        if self.quiet:
            return
        with self._print:
            if self._live is not None:
                self._live.console.print(f"  {text}", markup=False, highlight=False)
            else:
                print(f"  {text}", file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        """One line even with --json (on stderr): the operator must see it."""
        with self._print:
            if self._live is not None:
                self._live.console.print(f"meterota: warning: {text}", markup=False, highlight=False)
            else:
                print(f"meterota: warning: {text}", file=sys.stderr, flush=True)

    def _table(self) -> Any:
        from rich.table import Table

        t = Table(title=f"campaign {self.cid}", expand=False)
        t.add_column("")
        for s in STATES:
            t.add_column(s, justify="right")
        t.add_column("total", justify="right")
        overall = self.ledger.counts(self.cid).get("", {})
        rows = [("all", overall)]
        rows += [(f"group {k}", v) for k, v in sorted(self.ledger.counts(self.cid, "grp").items())]
        rows += [(f"via {k}", v) for k, v in sorted(self.ledger.counts(self.cid, "via").items())]
        for name, c in rows:
            t.add_row(name, *[str(c.get(s, 0)) for s in STATES], str(sum(c.values())))
        return t

    def _line(self) -> str:
        c = self.ledger.counts(self.cid).get("", {})
        done = sum(c.get(s, 0) for s in ("OK", "KO", "UNREACHABLE", "ERROR", "CANCELLED"))
        return (f"{done}/{sum(c.values())} done: {c.get('OK', 0)} OK, {c.get('KO', 0)} KO, "
                f"{c.get('UNREACHABLE', 0)} unreachable, {c.get('ERROR', 0)} error, "
                f"{c.get('running', 0)} running, {c.get('pending', 0)} pending")

    def _loop(self) -> None:
        while not self._done.wait(0.5):
            self.refresh()

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._table())
        elif not self.quiet:
            line = self._line()
            if line != self._last:
                self._last = line
                with self._print:
                    print(f"  {line}", file=sys.stderr, flush=True)

    def __enter__(self) -> "Progress":
        if self.tty:
            from rich.live import Live

            self._live = Live(self._table(), refresh_per_second=2, transient=False)
            self._live.start()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="campaign-progress")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread:
            self._thread.join()
        self.refresh()
        if self._live is not None:
            self._live.stop()


def _publish_url(args: argparse.Namespace, led: Ledger, cid: str) -> tuple[Any, float]:
    """--publish, else the plan's [publish] table; and how long to wait for the broker at the end."""
    from ..events import parse_url

    c = led.campaign(cid) or {}
    plan = c.get("plan", {})
    url = args.publish or (parse_url(plan["publish"]) if plan.get("publish") else None)
    wait = args.publish_wait if args.publish_wait is not None else float(plan.get("publish_wait", 10.0))
    return url, wait


def _run(args: argparse.Namespace, cid: str, st: Store, led: Ledger) -> int:
    from ..cli_events import warn
    from ..publish import publishing
    from .runner import Runner

    as_json = bool(getattr(args, "json", False))
    url, wait = _publish_url(args, led, cid)
    try:
        with Progress(led, cid, as_json) as prog, publishing(st, url, wait=wait, warn=prog.warn, note=prog.step):
            runner = Runner(st, led, cid, timeout=args.timeout, retries=args.retries, step=prog.step)
            summary = runner.run(lease=args.lease)
    except KeyboardInterrupt:
        print(f"meterota: campaign {cid} interrupted; `meterota campaign resume {cid}` carries on", file=sys.stderr)
        return 130
    doc = {"campaign": cid, "state": summary.state, "reason": summary.reason, "counts": summary.counts,
           "workorders": len(summary.workorders)}
    if as_json:
        print(json.dumps(doc, sort_keys=True))
    else:
        c = summary.counts
        print(f"campaign {cid} {summary.state}" + (f" ({summary.reason})" if summary.reason else "") + ": "
              + ", ".join(f"{c[s]} {s}" for s in STATES if c.get(s)))
        if summary.workorders:
            print(f"  {len(summary.workorders)} work orders: meterota workorders --campaign {cid}")
        print(f"  report: meterota report {cid} -o report.html")
    return summary.exit_code


def cmd_campaign_run(args: argparse.Namespace) -> int:
    from . import plan as pl
    from .runner import create

    plan = pl.load(args.plan)
    with _ledger(args) as (st, led):
        cid = create(led, plan, str(args.plan.resolve()), args.id)
        if not getattr(args, "json", False):
            print(f"campaign {cid}: {plan.name}, records in {st.path}", file=sys.stderr)
        return _run(args, cid, st, led)


def cmd_campaign_resume(args: argparse.Namespace) -> int:
    with _ledger(args, args.id) as (st, led):
        # Other processes working it (here or on other hosts) are fine: units are leased.
        return _run(args, args.id, st, led)


def cmd_campaign_worker(args: argparse.Namespace) -> int:
    """Take units of running campaigns until stopped (Ctrl-C, SIGTERM) or, with
    --until-idle, until no campaign is left unfinished."""
    import signal

    from .runner import Worker

    def term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, term)
    quiet = bool(getattr(args, "json", False))
    lock = threading.Lock()

    def step(text: str) -> None:
        if not quiet:
            with lock:
                print(f"  {text}", file=sys.stderr, flush=True)

    from ..cli_events import warn
    from ..publish import publishing

    with _ledger(args) as (st, led):
        for cid in args.campaign or []:
            if led.campaign(cid) is None:
                raise errors.MeterotaError(f"no campaign {cid} in {st.path}")
        w = Worker(st, led, concurrency=args.concurrency, lease=args.lease, campaigns=args.campaign or None,
                   timeout=args.timeout, retries=args.retries, step=step,
                   image=str(args.image) if args.image else None, until_idle=args.until_idle)
        if not quiet:
            print(f"worker {w.owner}: {args.concurrency} units at a time, leases of {args.lease:g} s, "
                  f"ledger {st.path}", file=sys.stderr, flush=True)
        # --publish, or the [publish] table of the one campaign it was given.
        url, wait = _publish_url(args, led, args.campaign[0]) if len(args.campaign or []) == 1 else \
            (args.publish, 10.0 if args.publish_wait is None else args.publish_wait)
        try:
            with publishing(st, url, wait=wait, warn=warn, note=step):
                w.run()
        except KeyboardInterrupt:
            print(f"meterota: worker {w.owner} stopped; its units were handed back", file=sys.stderr)
            return 0
        if quiet:
            print(json.dumps({"worker": w.owner, "units": w.took}, sort_keys=True))
        return 0


def cmd_campaign_status(args: argparse.Namespace) -> int:
    with _ledger(args, args.id) as (st, led):
        c = led.campaign(args.id)
        assert c is not None
        counts = led.counts(args.id)
        per_group = led.counts(args.id, "grp")
        per_via = led.counts(args.id, "via")
        wos = led.workorders(args.id)
        devices = led.devices(args.id)
        units = led.units(args.id)
        unit_counts: dict[str, int] = {}
        for u in units:
            unit_counts[u["state"]] = unit_counts.get(u["state"], 0) + 1
        workers = sorted({str(u["owner"]) for u in units if u["state"] == "leased" and u["expires"] is not None
                          and float(u["expires"]) >= float(u["now"])})
        if getattr(args, "json", False):
            doc = {k: c[k] for k in ("id", "name", "state", "reason", "version", "image_hash", "created",
                                     "finished", "phase")}
            doc.update(counts=counts.get("", {}), groups=per_group, concentrators=per_via,
                       workorders={"open": sum(w["state"] == "open" for w in wos),
                                   "closed": sum(w["state"] == "closed" for w in wos)},
                       units=unit_counts, workers=workers)
            if args.devices:
                doc["devices"] = [{k: v for k, v in d.items() if k not in ("record", "mac")} for d in devices]
            print(json.dumps(doc, sort_keys=True))
            return 0
        print(f"campaign {c['id']}: {c['name']}  image {c['version']} {c['image_hash'][:16]}…")
        print(f"  state {c['state']}" + (f" ({c['reason']})" if c["reason"] else "")
              + f", created {_when(c['created'])}, finished {_when(c['finished'])}")

        def line(name: str, cc: dict[str, int]) -> None:
            print(f"  {name:<24} " + "  ".join(f"{s} {cc.get(s, 0)}" for s in STATES) + f"  total {sum(cc.values())}")

        print("  units: " + ", ".join(f"{n} {k}" for k, n in sorted(unit_counts.items()))
              + (f"; leased by {', '.join(workers)}" if workers else ""))
        line("all", counts.get("", {}))
        for k, v in sorted(per_group.items()):
            line(f"group {k}", v)
        for k, v in sorted(per_via.items()):
            line(f"via {k}", v)
        print(f"  work orders: {sum(w['state'] == 'open' for w in wos)} open, "
              f"{sum(w['state'] == 'closed' for w in wos)} closed")
        if args.devices:
            for d in devices:
                print(f"  {d['device'] or d['target']:<16} {d['grp']:<10} {d['via'] or 'direct':<10} "
                      f"{d['state']:<11} {d['from_version'] or '-':>8} -> {d['to_version']:<8} "
                      f"attempts {d['attempts']}  {'verified' if d['verified'] else '        '} {d['reason'] or ''}")
        return 0


def cmd_campaign_list(args: argparse.Namespace) -> int:
    with _ledger(args) as (st, led):
        rows = led.campaigns()
        if getattr(args, "json", False):
            print(json.dumps(rows, sort_keys=True))
        else:
            for r in rows:
                print(f"{r['id']:<40} {r['state']:<8} {r['version']:<10} {r['ok']}/{r['total']} OK  "
                      f"created {_when(r['created'])}  {r['name']}")
        return 0


def cmd_campaign_abort(args: argparse.Namespace) -> int:
    from .runner import abort

    from ..cli_events import note, warn
    from ..publish import publishing

    with _ledger(args, args.id) as (st, led):
        url, wait = _publish_url(args, led, args.id)
        # With no campaign process left, the CANCELLED outcomes are recorded here: published from here.
        with publishing(st, url, wait=wait, warn=warn, note=note):
            for line in abort(led, args.id, args.reason, timeout=args.timeout, retries=args.retries):
                print(line)
        return 0


WORKORDER_FIELDS = ("id", "campaign", "device", "concentrator", "address", "version", "image_hash", "result",
                    "reason", "last_seen", "created", "state", "closed", "closed_by")


def _iso(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None


def workorders_text(rows: list[dict[str, Any]], fmt: str) -> str:
    out = [{k: (_iso(r[k]) if k in ("last_seen", "created", "closed") else r[k]) for k in WORKORDER_FIELDS}
           for r in rows]
    if fmt == "json":
        return json.dumps(out, indent=2) + "\n"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=WORKORDER_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(out)
    return buf.getvalue()


def _write(text: str, out: Path | None, what: str) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    try:
        out.write_text(text)
    except OSError as e:
        raise errors.MeterotaError(f"cannot write {what} to {out}: {e.strerror}") from None
    print(f"{what} written to {out}", file=sys.stderr)


def cmd_workorders(args: argparse.Namespace) -> int:
    with _ledger(args, args.campaign) as (st, led):
        rows = led.workorders(args.campaign, None if args.state == "all" else args.state)
        _write(workorders_text(rows, "json" if getattr(args, "json", False) else args.format), args.output,
               f"{len(rows)} work orders")
        return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import export

    with _ledger(args, args.id) as (st, led):
        _write(export.export(led, args.id, args.format), args.output, f"{args.format} export of {args.id}")
        return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import report

    with _ledger(args, args.id) as (st, led):
        out = args.output or Path(f"{args.id}.html")
        _write(report.render(led, args.id), out, "report")
        if not getattr(args, "json", False):
            print(out.resolve())
        return 0


def add_parsers(sub: Any, device_defaults: Callable[[argparse.ArgumentParser], None]) -> None:
    from ..cli_events import add_publish_arguments

    cp = sub.add_parser("campaign", help="batch upgrades over devices and concentrators (PLAN.toml)")
    cs = cp.add_subparsers(dest="campaign_cmd", required=True, metavar="ACTION")
    r = cs.add_parser("run", help="create a campaign from PLAN.toml and run it")
    r.add_argument("plan", type=Path)
    r.add_argument("--id", help="campaign id (default: from the plan's name and the time)")
    r.set_defaults(fn=cmd_campaign_run)
    rs = cs.add_parser("resume", help="continue a campaign whose host process was stopped")
    rs.add_argument("id")
    rs.set_defaults(fn=cmd_campaign_resume)
    wk = cs.add_parser("worker", help="take units of running campaigns (any number of workers on any hosts "
                       "sharing a PostgreSQL ledger)")
    wk.add_argument("--concurrency", type=int, default=4, help="units worked at once (default 4)")
    wk.add_argument("--campaign", action="append", metavar="ID", help="only this campaign (repeatable)")
    wk.add_argument("--image", type=Path, help="the campaign's image file on this host (default: the plan's path)")
    wk.add_argument("--until-idle", action="store_true", help="exit when no campaign is left unfinished")
    wk.set_defaults(fn=cmd_campaign_worker)
    for p in (r, rs, wk):
        device_defaults(p)
        add_publish_arguments(p, plan=True)
        p.add_argument("--lease", type=at.positive_float, default=lease_default(), metavar="S",
                       help="seconds a unit stays leased without renewal: the takeover time of a dead worker "
                            "(default $METEROTA_LEASE_S or 15)")
    s = cs.add_parser("status", help="counts overall, per group and per concentrator")
    s.add_argument("id")
    s.add_argument("--devices", action="store_true", help="one line per device")
    s.set_defaults(fn=cmd_campaign_status)
    li = cs.add_parser("list", help="all campaigns")
    li.set_defaults(fn=cmd_campaign_list)
    a = cs.add_parser("abort", help="stop a campaign: nothing new starts, concentrator jobs are cancelled")
    a.add_argument("id")
    a.add_argument("--reason", default="aborted by the operator")
    device_defaults(a)
    add_publish_arguments(a, plan=True)
    a.set_defaults(fn=cmd_campaign_abort)
    for p in (s, li, a, r, rs, wk):
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON document on stdout")

    w = sub.add_parser("workorders", help="field work orders: meters KO or unreachable after all retries")
    w.add_argument("--campaign", help="one campaign (default: all)")
    w.add_argument("--state", choices=["open", "closed", "all"], default="open")
    w.add_argument("--format", choices=["csv", "json"], default="csv")
    w.add_argument("-o", "--output", type=at.output_file, help="write to a file instead of stdout")
    w.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="same as --format json")
    w.set_defaults(fn=cmd_workorders)

    e = sub.add_parser("export", help="a campaign's results as CSV, JSON or CIM XML (IEC 61968-9 style)")
    e.add_argument("id")
    e.add_argument("--format", choices=["csv", "json", "cim"], default="csv")
    e.add_argument("-o", "--output", type=at.output_file, help="write to a file instead of stdout")
    e.set_defaults(fn=cmd_export)

    rp = sub.add_parser("report", help="a self-contained HTML report of a campaign")
    rp.add_argument("id")
    rp.add_argument("-o", "--output", type=at.output_file, help="the HTML file (default: ID.html)")
    rp.set_defaults(fn=cmd_report)


def campaign_device_defaults(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("links")
    g.add_argument("--timeout", type=at.positive_float, default=2.0,
                   help="seconds to wait for each reply (default 2)")
    g.add_argument("--retries", type=at.count, default=3, help="retries of a silent request (default 3)")
