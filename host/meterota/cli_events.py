"""`meterota events`: the event stream from the command line (thin: the work is
in events.py and publish.py).

    meterota events --subscribe mqtt://HOST/PREFIX [--format text|json|cim] [--to-dir DIR]
    meterota events flush --publish mqtt://HOST/PREFIX     send what the outbox still holds
    meterota events status                                  sent / waiting rows of the outbox
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import argtypes as at
from . import errors
from .events import BrokerURL, url_arg


def seconds0(s: str) -> float:
    """0 or more seconds (0: do not wait)."""
    return 0.0 if s.strip() in ("0", "0.0") else at.positive_float(s)


def warn(text: str) -> None:
    print(f"meterota: warning: {text}", file=sys.stderr, flush=True)


def note(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def add_publish_arguments(p: argparse.ArgumentParser, plan: bool = False) -> None:
    """--publish URL and --publish-wait for the commands that record outcomes."""
    p.add_argument("--publish", type=url_arg, metavar="mqtt://[USER:PASS@]HOST[:PORT]/PREFIX",
                   help="publish every outcome to this MQTT broker as it is recorded (mqtts:// for TLS)"
                   + ("; overrides the plan's [publish] table" if plan else ""))
    p.add_argument("--publish-wait", type=seconds0, default=None, metavar="S",
                   help="at the end, seconds to wait for the broker to take what is left (default 10)")


def _line(doc: dict[str, Any]) -> str:
    t = str(doc.get("t") or "")[11:19]
    if doc.get("type") == "campaign":
        c = doc.get("counts", {})
        return (f"{t} campaign {doc['campaign']} {doc['state']}: {doc['done']}/{doc['total']} done, "
                + ", ".join(f"{n} {s}" for s, n in sorted(c.items())))
    if doc.get("type") == "workorder":
        return (f"{t} {doc['device']:<16} work order {doc['workorder']} {doc['state']} "
                f"({doc['result']}, campaign {doc['campaign']})  [{doc['id'][:8]}]")
    where = f" campaign {doc['campaign']}" if doc.get("campaign") else ""
    retry = "" if doc.get("final", True) else " (will retry)"
    return (f"{t} {doc['device']:<16} {doc['result']}{retry} {doc.get('from_version') or '-'} -> "
            f"{doc.get('to_version')}{where}  {doc.get('reason', '')}  [{doc['id'][:8]}]")


def cmd_subscribe(args: argparse.Namespace) -> int:
    from .publish import Seen, file_name, subscribe, write_atomic

    url: BrokerURL = args.subscribe
    fmt = args.format or ("json" if args.to_dir else "text")
    if args.to_dir and fmt == "text":
        raise errors.MeterotaError("--to-dir writes json or cim files: use --format json or --format cim")
    if args.to_dir:
        try:
            args.to_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise errors.MeterotaError(f"cannot use {args.to_dir} as the drop folder: {e.strerror}") from None
    seen = Seen(args.to_dir)
    stop = threading.Event()
    count = [0]
    lock = threading.Lock()

    def handle(topic: str, doc: dict[str, Any], retained: bool) -> None:
        with lock:
            if not seen.add(str(doc["id"])):
                return  # a repeat after an outage: same id, already handled
            is_device = doc.get("type") != "campaign"
            if args.to_dir:
                if is_device and (fmt == "json" or doc.get("cim")):
                    text = doc["cim"] if fmt == "cim" else json.dumps(doc, indent=2, sort_keys=True) + "\n"
                    path = args.to_dir / file_name(doc, "xml" if fmt == "cim" else "json")
                    try:
                        write_atomic(path, text)
                        seen.commit(str(doc["id"]))
                    except OSError as e:  # not acknowledged: a persistent session gets it again
                        stop.set()
                        raise errors.MeterotaError(f"cannot write {path}: {e.strerror}") from None
            elif fmt == "json":
                print(json.dumps(doc, sort_keys=True), flush=True)
            elif fmt == "cim":
                if doc.get("cim"):
                    print(doc["cim"], end="", flush=True)
            else:
                print(_line(doc), flush=True)
            if is_device:
                count[0] += 1
                if args.count and count[0] >= args.count:
                    stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    timer = threading.Timer(args.timeout, stop.set) if args.timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    subscribe(url, handle, stop=stop, session=args.session, warn=warn, note=note)
    if args.count and count[0] < args.count:
        warn(f"{count[0]} of {args.count} device messages received before the timeout")
        return errors.EXIT_UNREACHABLE
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    from .publish import Publisher, PublishError
    from .store import Store

    if args.publish is None:
        raise errors.MeterotaError("events flush needs --publish mqtt://HOST/PREFIX")
    with Store(args.db) as st:
        before = st.outbox_counts()["unsent"]
        pub = Publisher(st, args.publish, warn=warn, note=note)
        t0 = time.monotonic()
        try:
            n = pub.flush()
        except PublishError as e:
            left = st.outbox_counts()["unsent"]
            print(f"meterota: error: MQTT {args.publish.safe()}: {e}; {before - left} sent, {left} still in the "
                  "outbox", file=sys.stderr)
            return errors.EXIT_UNREACHABLE
        dt = time.monotonic() - t0
        left = st.outbox_counts()["unsent"]
    doc = {"sent": n, "unsent": left, "seconds": round(dt, 3)}
    if getattr(args, "json", False):
        print(json.dumps(doc))
    else:
        print(f"{n} messages sent to {args.publish.safe()} in {dt:.2f} s; {left} left in the outbox")
    return 0 if left == 0 else errors.EXIT_UNREACHABLE


def cmd_status(args: argparse.Namespace) -> int:
    from .store import Store

    with Store(args.db) as st:
        c = st.outbox_counts()
    if getattr(args, "json", False):
        print(json.dumps(c))
    else:
        print(f"outbox of {args.db or 'the records store'}: {c['sent']} sent, {c['unsent']} waiting")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    if args.action == "flush":
        return cmd_flush(args)
    if args.action == "status":
        return cmd_status(args)
    if args.subscribe is None:
        raise errors.MeterotaError("events needs --subscribe URL, or the action flush or status")
    return cmd_subscribe(args)


def add_parser(sub: Any) -> None:
    e = sub.add_parser("events", help="the event stream on MQTT: watch or collect it (--subscribe), "
                       "send the outbox (flush), outbox counts (status)",
                       description="Every recorded outcome is a message (docs/events.md). --subscribe shows "
                       "them live or writes each as a file (a legacy drop folder), once per message id.")
    e.add_argument("action", nargs="?", choices=["flush", "status"], help="flush: send what the outbox holds "
                   "(needs --publish); status: its counts")
    e.add_argument("--subscribe", type=url_arg, metavar="mqtt://[USER:PASS@]HOST[:PORT]/PREFIX")
    e.add_argument("--format", choices=["text", "json", "cim"], default=None,
                   help="text lines (default on stdout), JSON documents, or the CIM EndDeviceEvents XML")
    e.add_argument("--to-dir", type=Path, metavar="DIR", help="write each device message as a file in DIR "
                   "(TIME-DEVICE-ID.json or .xml), written once per message id")
    e.add_argument("--session", metavar="NAME", help="a persistent session under this client id: the broker "
                   "keeps messages for the consumer while it is away")
    e.add_argument("--count", type=at.count, default=0, help="stop after N device messages")
    e.add_argument("--timeout", type=at.positive_float, default=None, help="stop after S seconds")
    e.add_argument("--publish", type=url_arg, metavar="URL", help="flush: the broker to send to")
    e.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON document on stdout")
    e.set_defaults(fn=cmd_events)
