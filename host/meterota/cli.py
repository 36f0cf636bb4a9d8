"""`meterota`: a thin command line over the library. Exit codes: see errors.py
and README "Exit codes". A user error prints one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__, errors
from . import argtypes as at
from . import image as img
from .client import SMPClient, SMPError
from .errors import MeterotaError
from .protocol import FIRMWARE_UPLOAD_IMAGE as P_FIRMWARE_UPLOAD
from .store import Store
from .transport import from_address

DEVICE_HELP = "serial device or pyserial URL (socket://host:port, rfc2217://...)"


# -- output -----------------------------------------------------------------------------------
class Out:
    """Rich on a terminal, plain lines otherwise, one JSON document with --json."""

    def __init__(self, as_json: bool, quiet: bool = False):
        self.json = as_json
        self.quiet = quiet or as_json
        self.tty = sys.stderr.isatty() and not self.quiet

    def step(self, text: str) -> None:
        if not self.quiet:
            print(f"  {text}", file=sys.stderr, flush=True)

    def result(self, doc: dict[str, Any], human: Callable[[], None]) -> None:
        if self.json:
            print(json.dumps(doc, default=_jsonable, sort_keys=True))
        else:
            human()

    def progress(self, total_label: str) -> "ProgressSink":
        return ProgressSink(self, total_label)


class ProgressSink:
    def __init__(self, out: Out, label: str):
        self.out = out
        self.label = label
        self._rich: Any = None
        self._task: Any = None
        self._last_decile = -1

    def __enter__(self) -> "ProgressSink":
        if self.out.tty:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._rich = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
            self._rich.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._rich is not None:
            if self._task is None:
                self._task = self._rich.add_task(self.label, total=total)
            self._rich.update(self._task, completed=done)
        elif not self.out.quiet:
            decile = done * 10 // max(1, total)
            if decile != self._last_decile:
                self._last_decile = decile
                print(f"  {self.label}: {done}/{total} bytes ({decile * 10}%)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(type(v).__name__)


# -- device plumbing --------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> SMPClient:
    if not (args.port or args.udp):
        raise errors.UsageError("no device given: use --port PORT or --udp HOST[:PORT]")
    t = from_address(args.port, args.udp, args.baud)
    t.open()
    return SMPClient(t, timeout=args.timeout, retries=args.retries)


def _connected(args: argparse.Namespace) -> Iterator[SMPClient]:
    c = _client(args)
    try:
        c.connect(negotiate=not args.console)
        yield c
    finally:
        c.close()


def open_store(path: Path | str | None) -> Store:
    """The records database (a SQLite file or a postgresql:// URL), or one line
    saying why it cannot be opened (exit 12)."""
    from .db import is_url
    from .store import default_path

    target = path if path else default_path()
    if is_url(target):
        return Store(str(target))  # db.DatabaseError (a StoreError, exit 12) says what is wrong, in one line
    where = Path(target)
    if where.is_dir():
        raise errors.StoreError(f"records database {where}: is a directory")
    try:
        return Store(where)
    except sqlite3.Error as e:
        raise errors.StoreError(f"records database {where}: {e}") from None
    except OSError as e:
        raise errors.StoreError(f"records database {where}: {e.strerror or e}") from None


def _store(args: argparse.Namespace) -> Store:
    return open_store(args.db)


def _publishing(args: argparse.Namespace, st: Store) -> Any:
    """--publish: outcomes recorded in `st` inside this block also go to the broker."""
    from .cli_events import note, warn
    from .publish import publishing

    wait = getattr(args, "publish_wait", None)
    return publishing(st, getattr(args, "publish", None), wait=10.0 if wait is None else wait, warn=warn,
                      note=note)


def _read_image(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise errors.ImageError(f"cannot read image {path}: {e.strerror}") from None


def _image(path: Path) -> tuple[bytes, img.ImageInfo]:
    """An image file for an upgrade or a job: readable, an MCUboot image, its hash TLV right (exit 8)."""
    data = _read_image(path)
    return data, img.checked(data, str(path))


def _hexkey(s: str) -> bytes:
    try:
        k = bytes.fromhex(s)
    except ValueError:
        raise argparse.ArgumentTypeError("key must be hex") from None
    if len(k) != 32:
        raise argparse.ArgumentTypeError("key must be 32 bytes (64 hex digits)")
    return k


# -- commands ---------------------------------------------------------------------------------
def cmd_sim(args: argparse.Namespace) -> int:
    from .boards import provision_unix
    from .lab.sim import run_sim_cli

    if args.concentrators:
        return _sim_fleet(args)

    def register(cluster: Any) -> None:
        with _store(args) as st:
            for d in cluster:
                st.set_key(d.device_id, d.key, d.board, d.address)

    return run_sim_cli(args, provision=provision_unix, on_started=register)


def _ids(v: str | None) -> set[str]:
    return {x for x in (v or "").split(",") if x}


def _sim_fleet(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .lab.fleet import Fleet, FleetOptions

    opts = FleetOptions(unreachable=_ids(args.unreachable), lossy=_ids(args.lossy), fail_trial=_ids(args.fail_trial),
                        slow=_ids(args.slow), transport=args.transport, heap=args.heap, medium=args.medium,
                        parallel=args.parallel, multicast=args.multicast)
    try:
        fleet = Fleet(args.dir, args.concentrators, args.meters, opts)
    except ValueError as e:
        print(f"meterota sim: {e}", file=sys.stderr)
        return errors.EXIT_USAGE
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        fleet.start(timeout=max(args.timeout or 20.0, 60.0))
        with _store(args) as st:
            for d in fleet.meters + fleet.concentrators:
                st.set_key(d.device_id, d.key, "unix", d.address)
        for c in fleet.concentrators:
            cfg = json.loads((c.state_dir / "config.json").read_text())
            doc = {"id": c.device_id, "address": c.address, "role": "concentrator",
                   "meters": [m["id"] for m in cfg["meters"]]}
            if "medium" in cfg:
                doc["medium"] = args.medium
            print(json.dumps(doc) if args.json else f"{c.device_id} {c.address} meters: {', '.join(doc['meters'])}",
                  flush=True)
        stop.wait()
        return 0
    finally:
        fleet.stop()


def cmd_image_build(args: argparse.Namespace) -> int:
    out = Out(args.json)
    from .boards import firmware_slot_size
    from .boards import slot_size as board_slot_size

    board = args.board or ("esp32" if args.firmware else "unix")
    if args.firmware and args.app_dir:
        raise errors.MeterotaError("give an application directory or --firmware, not both")
    try:
        slot_size = args.slot_size or (firmware_slot_size(board) if args.firmware else board_slot_size(board))
    except (FileNotFoundError, ValueError) as e:
        raise errors.ImageError(str(e)) from None
    if args.firmware:
        data = img.build_firmware_image(_read_image(args.firmware), args.version, slot_size=slot_size, key=args.key,
                                        board=board, security_counter=args.security_counter)
    else:
        data = img.build_image(args.app_dir, args.version, slot_size=slot_size, key=args.key,
                               runtime=not args.no_runtime, mpy=not args.no_mpy, board=board,
                               security_counter=args.security_counter)
    args.output.write_bytes(data)
    info = img.parse(data)
    doc = {"file": str(args.output), "size": len(data), "version": info.version_str, "hash": info.hash.hex(),
           "signature": info.signature_type, "kind": info.kind or "bundle"}
    out.result(doc, lambda: print(f"{args.output}: {'native firmware, ' if info.is_firmware else ''}{len(data)} "
                                  f"bytes, version {info.version_str}, hash {info.hash.hex()}, "
                                  f"{info.signature_type or 'unsigned'}"))
    return 0


def cmd_image_info(args: argparse.Namespace) -> int:
    out = Out(args.json)
    data = _read_image(args.file)
    info = img.parse(data)
    sig_ok = img.verify_signature(data, args.key) if args.key else None
    doc = {"file": str(args.file), "size": info.size, "version": info.version_str, "header_size": info.hdr_size,
           "payload_size": info.img_size, "protected_tlv_size": info.protect_tlv_size, "flags": info.flags,
           "hash": info.hash.hex(), "hash_ok": info.hash_ok, "file_sha256": info.file_sha256.hex(),
           "signature": info.signature_type, "security_counter": info.security_counter, "board": info.board,
           "signature_ok": sig_ok, "kind": info.kind or "bundle",
           "tlvs": [{"type": f"{t:#x}", "name": img.TLV_NAMES.get(t, "?"), "len": len(v)} for t, v in info.tlvs]}

    def human() -> None:
        print(f"{args.file}")
        print(f"  version      {info.version_str}")
        print(f"  size         {info.size} bytes (header {info.hdr_size}, payload {info.img_size}, "
              f"protected TLVs {info.protect_tlv_size})")
        print(f"  hash         {info.hash.hex()} ({'ok' if info.hash_ok else 'MISMATCH'})")
        print(f"  file sha256  {info.file_sha256.hex()}")
        print(f"  signature    {info.signature_type or 'none'}"
              + ("" if sig_ok is None else (" (verified)" if sig_ok else " (DOES NOT VERIFY with that key)")))
        if info.security_counter is not None:
            print(f"  sec counter  {info.security_counter}")
        if info.board:
            print(f"  board        {info.board}")
        if info.is_firmware:
            print(f"  kind         native firmware (SMP image 1: upload with image {P_FIRMWARE_UPLOAD})")
        print("  TLVs         " + ", ".join(f"{img.TLV_NAMES.get(t, hex(t))}({len(v)})" for t, v in info.tlvs))

    out.result(doc, human)
    if not info.hash_ok or sig_ok is False:
        return errors.EXIT_IMAGE
    return 0


def cmd_image_keygen(args: argparse.Namespace) -> int:
    img.keygen(args.output)
    print(f"{args.output}: Ed25519 key; device public key {img.public_key_raw(args.output).hex()}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    out = Out(args.json)
    for c in _connected(args):
        info = c.device_info or {}
        doc = {"address": c.t.name, "params": vars(c.params), "os": c.os_info("a"), **info}

        def human() -> None:
            print(f"{info.get('id', '?')} at {c.t.name}: board {info.get('board', '?')}, role {info.get('role', '?')}")
            print(f"  os       {doc['os']}")
            print(f"  buffers  {c.params.buf_count} x {c.params.buf_size} B, framings "
                  f"{', '.join(info.get('framings', ['console']))}")
            print(f"  boots    {info.get('boots')}  trial: {info.get('trial')}  "
                  f"self-confirm: {info.get('self_confirm')}  signed only: {info.get('signed_only')}")
            if info.get("revert_reason"):
                print(f"  last revert: {info['revert_reason']}")
            _print_slots(info)

        out.result(doc, human)
    return 0


def _print_slots(info: dict[str, Any]) -> None:
    for s in info.get("slots", []):
        flags = [f for f in ("active", "pending", "bootable") if s.get(f)]
        h = s.get("hash")
        print(f"  slot {s['slot']}  {s.get('version', 'empty'):<12} "
              f"{(h.hex()[:16] + '…') if h else '':<18} {s['size'] // 1024} KiB  {' '.join(flags)}")


def cmd_images(args: argparse.Namespace) -> int:
    out = Out(args.json)
    for c in _connected(args):
        images = c.image_state()
        info = c.device_info

        def human() -> None:
            for e in images:
                flags = [f for f in ("active", "confirmed", "pending", "permanent", "bootable") if e.get(f)]
                what = f"image {e['image']} slot {e['slot']}" if "image" in e else f"slot {e['slot']}"
                print(f"{what}: {e['version']:<10} {bytes(e['hash']).hex()}  {' '.join(flags)}")
            if info and info.get("revert_reason"):
                print(f"last revert: {info['revert_reason']}")

        out.result({"images": images, "revert_reason": info.get("revert_reason") if info else None}, human)
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    out = Out(args.json)
    data = _read_image(args.image)
    info = img.parse(data)
    # A native firmware image (KIND TLV) goes to image 1's upload number, a bundle to 1.
    slot = args.slot if args.slot is not None else (P_FIRMWARE_UPLOAD if info.is_firmware else 1)
    for c in _connected(args):
        with out.progress("upload") as prog:
            try:
                st = c.upload(data, image=slot, upgrade=args.upgrade, progress=prog)
            except SMPError as e:
                from .upgrade import firmware_refusal

                raise firmware_refusal(e) if info.is_firmware else e from None
        doc = vars(st)
        out.result(doc, lambda: print(f"uploaded {st.bytes} bytes in {st.seconds:.2f} s "
                                      f"({st.bytes / max(st.seconds, 1e-9) / 1000:.1f} kB/s)"
                                      + (f", resumed at {st.resumed_from}" if st.resumed_from else "")
                                      + (", match" if st.match else "")))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    out = Out(args.json)
    h = args.hash if args.hash else img.parse(_read_image(args.image)).hash
    for c in _connected(args):
        images = c.image_test(h, permanent=args.permanent)
        out.result({"images": images}, lambda: print(f"marked {h.hex()[:16]}… for "
                                                     f"{'permanent' if args.permanent else 'test'}; reset to boot it"))
    return 0


def cmd_confirm(args: argparse.Namespace) -> int:
    out = Out(args.json)
    for c in _connected(args):
        images = c.image_confirm()
        out.result({"images": images}, lambda: print("running image confirmed"))
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    for c in _connected(args):
        c.reset()
        if not args.json:
            print("reset requested")
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    for c in _connected(args):
        c.image_erase(args.slot)
        if not args.json:
            print(f"slot {args.slot} erased")
    return 0


def cmd_confirmation(args: argparse.Namespace) -> int:
    from .confirm import verify

    out = Out(args.json)
    for c in _connected(args):
        r = c.confirmation()
        dev = str((c.device_info or {}).get("id", ""))
        with _store(args) as st:
            key = args.key or st.key(dev)
        if key is None:
            raise errors.ConfirmationError(f"no HMAC key known for device {dev}: pass --key")
        conf = verify(bytes(r["rec"]), bytes(r["mac"]), key, device_id=dev)
        out.result(conf.as_dict(), lambda: print(f"{conf.device_id} record #{conf.seq}: {conf.result} "
                                                  f"{conf.version} (from {conf.previous_version}): {conf.reason} "
                                                  "[MAC verified]"))
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from .upgrade import Upgrader

    if args.via:
        if not args.meter:
            raise errors.UsageError("--via needs --meter ID")
        if args.campaign:
            _check_campaign(args, args.campaign)
        args.port, args.udp = (args.via, None) if not args.via.startswith("udp:") else (None, args.via[4:])
        return cmd_upgrade_via(args)
    out = Out(args.json)
    data, _ = _image(args.image)
    campaign = getattr(args, "campaign", None)
    if campaign:
        _check_campaign(args, campaign)
    c = _client(args)
    try:
        with _store(args) as st, _publishing(args, st), out.progress("upload") as prog:
            up = Upgrader(c, st, key=args.key, allow_downgrade=args.allow_downgrade,
                          reset_timeout=args.reset_timeout, progress=prog, step=out.step,
                          campaign=campaign, negotiate=not args.console)
            try:
                res = up.run(data)
            finally:
                if campaign and up.last is not None and up.last.recorded:
                    _field_result(st, campaign, up.last, out)
    finally:
        c.close()
    conf = res.confirmation or {}
    out.result(res.as_dict(), lambda: print(
        f"{res.device}: {res.result} {res.from_version} -> {res.to_version} in {res.seconds:.1f} s"
        + (f", upload {res.upload.get('bytes', 0) / max(res.upload.get('seconds') or 1e-9, 1e-9) / 1000:.1f} kB/s"
           if res.upload.get("bytes") else "")
        + (f"\n  confirmation #{conf['seq']}: {conf['result']} ({conf['reason']}), MAC verified" if conf else "")))
    return 0


def _check_campaign(args: argparse.Namespace, cid: str) -> None:
    from .campaign.ledger import Ledger

    with _store(args) as st:
        if Ledger(st).campaign(cid) is None:
            raise errors.UsageError(f"no campaign {cid} in {st.path}")


def _field_result(st: Store, cid: str, res: Any, out: Out) -> None:
    """A technician's upgrade under --campaign: into the ledger; an OK closes the work order."""
    from .campaign.runner import record_field_upgrade
    from .campaign.ledger import Ledger

    closed = record_field_upgrade(Ledger(st), cid, res)
    for w in closed:
        out.step(f"work order {w['id']} for {w['device']} closed")


def cmd_deploy(args: argparse.Namespace) -> int:
    import secrets

    from . import deploy as dep
    from .boards import slot_size as board_slot_size

    dep.check_board(args.board)
    key = args.hmac_key or secrets.token_bytes(32)
    cfg: dict[str, Any] = {"id": args.id, "role": args.role, "key": key.hex(), "serial": args.serial,
                           "self_confirm": args.self_confirm, "allow_downgrade": args.allow_downgrade}
    if args.pubkey_from:
        cfg["pubkey"] = img.public_key_raw(args.pubkey_from).hex()
    if args.wifi_ssid:
        cfg["wifi"] = {"ssid": args.wifi_ssid, "key": args.wifi_key or ""}
    if args.image:
        image = _read_image(args.image)
    else:
        image = img.build_image(None, args.version, slot_size=board_slot_size(args.board), board=args.board,
                                key=args.sign_key)
    img.parse(image)
    dep.deploy(args.port, args.board, cfg, image=image, variant=args.variant,
               progress=lambda m: print(f"  {m}", file=sys.stderr))
    with _store(args) as st:
        st.set_key(args.id, key, args.board, args.port)
    print(f"{args.id}: meterota deployed on {args.port} ({args.board}); HMAC key registered in {st.path}")
    return 0


def _conc(c: SMPClient) -> Any:
    from .concentrator import Concentrator

    return Concentrator(c)


def cmd_meters(args: argparse.Namespace) -> int:
    out = Out(args.json)
    for c in _connected(args):
        ms = _conc(c).meters()

        def human() -> None:
            for m in ms:
                since = time.strftime("%H:%M:%S", time.localtime(m["since"])) if m["since"] else "-"
                print(f"{m['id']:<16} {m['link']:<24} {'up' if m['reachable'] else 'DOWN':<5} since {since:<9} "
                      f"{m['version'] or '-':<10} {m['state']}")

        out.result({"meters": ms}, human)
    return 0


def _job_spec(args: argparse.Namespace) -> Any:
    from .concentrator import JobSpec

    window = (args.not_before, args.not_after) if args.not_before or args.not_after else None
    return JobSpec(targets=args.meters.split(",") if args.meters else None, priority=args.priority,
                   retries=args.job_retries, duration=args.duration,
                   window=(int(window[0] or 0), int(window[1] or 2**31 - 1)) if window else None,
                   parallel=getattr(args, "parallel", None), mode=getattr(args, "mode", None))


def _finish_job(args: argparse.Namespace, conc: Any, job: int, out: Out) -> int:
    from .concentrator import record_results

    last: list[str] = [""]

    def show(s: dict[str, Any]) -> None:
        line = f"job {job}: {s['ok']} OK, {s['ko']} KO, {s['unreachable']} unreachable, {s['pending']} pending"
        if line != last[0]:
            last[0] = line
            out.step(line)

    st = conc.wait(job, args.wait_timeout, on_status=show)
    h = bytes(st["hash"])
    info = conc.store_info() or {}
    version = str(info.get("version", "?")) if info.get("hash") == h else "?"
    with _store(args) as db, _publishing(args, db):
        rows = record_results(list(conc.results(job)), db, h, version, conc.c.t.name, getattr(args, "campaign", None),
                              conc_id=str((conc.c.device_info or {}).get("id") or conc.c.t.name), job=job)
    out.result({"job": job, "status": st, "results": rows}, lambda: _print_results(job, st, rows))
    bad = [r for r in rows if r["result"] != "OK" or not r["verified"]]
    if any(r["result"] == "ERROR" for r in rows):
        return errors.EXIT_CONFIRMATION
    if any(r["result"] == "KO" for r in bad):
        return errors.EXIT_KO
    return errors.EXIT_UNREACHABLE if bad else 0


def _print_results(job: int, st: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print(f"job {job} {st['state']}: {st['ok']} OK, {st['ko']} KO, {st['unreachable']} unreachable")
    for r in rows:
        via = f"via {r['via']:<9} " if r.get("via") else ""
        if r.get("via") == "multicast":  # how its losses were repaired: broadcast XOR rounds, unicast bytes
            via += f"({r.get('xor_blocks') or 0} blocks by XOR repair, {r.get('unicast_bytes') or 0} B unicast) "
        print(f"  {r['meter']:<16} {r['result']:<11} {'verified' if r['verified'] else '        '} "
              f"attempts {r['attempts']}  {via}{r['reason']}")


def cmd_job(args: argparse.Namespace) -> int:
    out = Out(args.json)
    image = _image(args.image) if args.job_cmd == "create" else None  # a bad file before the device
    if getattr(args, "campaign", None):
        _check_campaign(args, args.campaign)  # an unknown campaign before the device, as everywhere
    for c in _connected(args):
        conc = _conc(c)
        if args.job_cmd == "create":
            assert image is not None
            data, info = image
            with out.progress("store") as prog:
                conc.store(data, progress=prog)
            job = conc.create_job(info.hash, _job_spec(args))
            if args.wait:
                return _finish_job(args, conc, job, out)
            out.result({"job": job}, lambda: print(f"job {job} created"))
        elif args.job_cmd == "status":
            jobs = conc.status(args.job)
            out.result({"jobs": jobs}, lambda: [print(
                f"job {j['job']:<4} {j['state']:<9} prio {j['priority']:<3} {j['ok']} OK, {j['ko']} KO, "
                f"{j['unreachable']} unreachable, {j['pending']} pending of {j['total']}") for j in jobs])
        elif args.job_cmd == "cancel":
            conc.cancel(args.job)
            out.result({"job": args.job, "cancelled": True}, lambda: print(f"job {args.job} cancelled"))
        elif args.job_cmd == "results":
            args.wait_timeout = 0.0
            return _finish_job(args, conc, args.job, out) if conc.status(args.job)[0]["state"] in (
                "done", "cancelled") else _partial_results(args, conc, out)
    return 0


def _partial_results(args: argparse.Namespace, conc: Any, out: Out) -> int:
    rows = list(conc.results(args.job))
    out.result({"job": args.job, "results": rows}, lambda: [print(
        f"  {r['meter']:<16} {r['result']:<11} attempts {r['attempts']}  {r['reason']}") for r in rows])
    return 0


def cmd_upgrade_via(args: argparse.Namespace) -> int:
    from .concentrator import JobSpec

    out = Out(args.json)
    data, info = _image(args.image)
    for c in _connected(args):
        conc = _conc(c)
        if args.meter not in {m["id"] for m in conc.meters()}:
            raise errors.RefusedError(f"{args.meter} is not a meter of {c.t.name}")
        with out.progress("store") as prog:
            conc.store(data, progress=prog)
        job = conc.create_job(info.hash, JobSpec(targets=[args.meter], retries=args.job_retries,
                                                 duration=int(args.wait_timeout)))
        out.step(f"job {job} on {c.t.name} for {args.meter}")
        return _finish_job(args, conc, job, out)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    with _store(args) as st:
        st.set_key(args.device, args.hexkey)
    print(f"key for {args.device} stored in {st.path}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _store(args) as st:
        for row in st.db.rows("SELECT id, board, address FROM devices ORDER BY id"):
            print(f"{row['id']:<16} {row['board'] or '-':<8} {row['address'] or ''}")
    return 0


def _import_spool(args: argparse.Namespace) -> int:
    """`records import [SPOOL]`: outcomes a locked database could not take."""
    import types

    from .campaign.ledger import Ledger
    from .campaign.runner import record_field_upgrade

    with _store(args) as st:
        spool = Path(args.spool) if args.spool else st.spool_path()
        led: list[Any] = []

        def field(o: Any, conf: Any, got: Any) -> None:
            if not led:
                led.append(Ledger(st))
            if led[0].campaign(o.campaign) is None:
                return
            res = types.SimpleNamespace(device=o.device, address=o.address, image_hash=o.image_hash,
                                        to_version=o.to_version, result=o.result, reason=o.reason,
                                        from_version=o.from_version, record_id=got.id,
                                        confirmation=conf.as_dict() if conf else None)
            for w in record_field_upgrade(led[0], o.campaign, res):
                print(f"work order {w['id']} for {w['device']} closed", file=sys.stderr)

        taken, problems = st.import_spool(spool, key=args.key, on_field=field)
    for p in problems:
        print(f"meterota: {p}", file=sys.stderr)
    print(f"{taken} outcomes imported from {spool} into {st.path}" + (f"; {len(problems)} left in the spool"
                                                                       if problems else ""))
    return errors.EXIT_CONFIRMATION if problems else 0


def cmd_records(args: argparse.Namespace) -> int:
    if args.action == "import":
        return _import_spool(args)
    with _store(args) as st:
        rows = list(st.outcomes(args.device, args.limit))
        if st.spool_path().exists():
            print(f"meterota: outcomes wait in {st.spool_path()} (the database was locked): "
                  "`meterota records import` records them", file=sys.stderr)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            t = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"]))
            print(f"{t} {r['device']:<14} {r['from_version'] or '-':>10} -> {r['to_version']:<10} "
                  f"{r['result']:<11} {'verified' if r['verified'] else '        '} {r['reason'] or ''}")
    return 0


# -- parser -----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """A bad command line is one line too (exit 2), naming the help to read."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(errors.EXIT_USAGE, f"meterota: error: {message} (see `{self.prog} --help`)\n")


def _via_address(s: str) -> str:
    """--via takes a serial port or udp:HOST[:PORT]; the UDP form is checked like --udp."""
    return at.udp_address(s) if s.startswith("udp:") else s


def _device_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device")
    g.add_argument("--port", help=DEVICE_HELP)
    g.add_argument("--udp", metavar="HOST[:PORT]", type=at.udp_address, help="SMP over UDP (port 1337 by default)")
    g.add_argument("--baud", type=at.baud, default=115200, help="serial baud rate (default 115200)")
    g.add_argument("--timeout", type=at.positive_float, default=2.0,
                   help="seconds to wait for each reply (default 2)")
    g.add_argument("--retries", type=at.count, default=3,
                   help="retries of a silent request (default 3); an upload resends from the device's "
                   "offset through retries + 2 silent waits in a row")
    g.add_argument("--console", action="store_true", help="stay on the standard SMP console framing")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON document on stdout")


def build_parser() -> argparse.ArgumentParser:
    from .cli_events import add_publish_arguments

    p = _Parser(prog="meterota", description="Firmware upgrades for MicroPython meter NICs over SMP")
    p.add_argument("--version", action="version", version=f"meterota {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v steps, -vv protocol traces")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--db", default=None, metavar="FILE|URL", help="records database: a SQLite file or a "
                   "postgresql://user:password@host/db URL (default $METEROTA_DB or "
                   "~/.local/share/meterota/meterota.db)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .lab.sim import add_sim_arguments

    s = sub.add_parser("sim", help="run simulated devices under MicroPython")
    add_sim_arguments(s)
    f = s.add_argument_group("fan-out (concentrators with meters)")
    f.add_argument("--concentrators", type=at.count, default=0, help="start N concentrators ...")
    f.add_argument("--meters", type=at.positive_int, default=4, help="... each with M meters on UDP links (default 4)")
    f.add_argument("--unreachable", metavar="IDS", help="meters listed but never started (e.g. meter-0103)")
    f.add_argument("--lossy", metavar="IDS", help="meters behind a proxy that loses 15%% of datagrams")
    f.add_argument("--slow", metavar="IDS", help="meters with 50 ms added to every datagram each way")
    f.add_argument("--fail-trial", metavar="IDS", help="meters whose hardware fails every trial boot")
    f.add_argument("--medium", metavar="SPEC", help="each concentrator's meters on one simulated medium: "
                   "shared:RATE[,loss=P%%,latency=MS] (PLC-like, one transmission at a time) or star:RATE[,...] "
                   "(Wi-Fi-like, a link per meter), e.g. shared:50k,loss=5%%")
    f.add_argument("--parallel", type=int, metavar="K", help="meters a concentrator works on at once (default 8)")
    f.add_argument("--multicast", choices=["auto", "multicast", "unicast"],
                   help="the concentrators' session mode (default auto: multicast on a shared medium)")
    s.set_defaults(fn=cmd_sim)

    im = sub.add_parser("image", help="build and inspect MCUboot images").add_subparsers(dest="image_cmd",
                                                                                          required=True)
    b = im.add_parser("build", help="application bundle -> littlefs -> signed MCUboot image; or with "
                      "--firmware, an ESP32 MicroPython app image -> signed MCUboot image (SMP image 1)")
    b.add_argument("app_dir", type=Path, nargs="?", help="application directory (default: the runtime only)")
    b.add_argument("--firmware", type=Path, metavar="APP_BIN", help="wrap this bare ESP app image "
                   "(micropython.bin / *.app-bin, not the combined firmware.bin) as native firmware; "
                   "--board defaults to esp32, the bound is its OTA partition size")
    b.add_argument("--version", required=True, help="X.Y.Z[+BUILD]")
    b.add_argument("--key", type=at.input_file, help="signing key (Ed25519 PEM, see `image keygen`)")
    b.add_argument("-o", "--output", type=at.output_file, required=True)
    b.add_argument("--board", default=None, help="board the image is for: its slot size bounds the image and "
                   "devices of other boards refuse it (default unix; esp32 with --firmware)")
    b.add_argument("--security-counter", help="MCUboot security counter (a number, or 'auto')")
    b.add_argument("--slot-size", type=at.positive_int, help="override the slot size")
    b.add_argument("--no-runtime", action="store_true", help="do not include the meterota device runtime")
    b.add_argument("--no-mpy", action="store_true", help="ship .py sources instead of .mpy")
    b.set_defaults(fn=cmd_image_build)
    i = im.add_parser("info", help="version, sizes, hashes and signature of an image")
    i.add_argument("file", type=Path)
    i.add_argument("--key", type=at.input_file, help="verify the signature with this key")
    i.set_defaults(fn=cmd_image_info)
    k = im.add_parser("keygen", help="make an Ed25519 signing key")
    k.add_argument("-o", "--output", type=at.output_file, required=True)
    k.set_defaults(fn=cmd_image_keygen)

    for name, fn, hlp in (("info", cmd_info, "identity, board, role, slots and last revert reason"),
                          ("images", cmd_images, "the SMP image state (slots, versions, hashes, flags)"),
                          ("confirm", cmd_confirm, "confirm the running image"),
                          ("reset", cmd_reset, "reset the device"),
                          ("confirmation", cmd_confirmation, "fetch and verify the latest confirmation record")):
        sp = sub.add_parser(name, help=hlp)
        _device_args(sp)
        if name == "confirmation":
            sp.add_argument("--key", type=_hexkey, help="device HMAC key (hex); default: the key registry")
        sp.set_defaults(fn=fn)

    u = sub.add_parser("upgrade", help="the whole upgrade: upload, test, reset, confirm, verify, record")
    _device_args(u)
    u.add_argument("image", type=Path)
    u.add_argument("--key", type=_hexkey, help="device HMAC key (hex); default: the key registry")
    u.add_argument("--allow-downgrade", action="store_true", help="accept an image older than the running one")
    u.add_argument("--reset-timeout", type=at.positive_float, default=None,
                   help="seconds to wait for the device after reset (default: by its board, 30 s for the "
                        "simulator, 120 s for rp2/esp32, at least five reply waits of the link)")
    u.add_argument("--campaign", help="a field upgrade for this campaign: its verified result goes into the "
                   "campaign's ledger and an OK closes the device's work order")
    u.add_argument("--via", metavar="CONCENTRATOR", type=_via_address, help="upgrade a meter through this concentrator "
                   "(a serial port or udp:HOST)")
    u.add_argument("--meter", help="with --via: the meter's id")
    u.add_argument("--wait-timeout", type=at.positive_float, default=600.0,
                   help="with --via: seconds to wait for the job")
    u.add_argument("--job-retries", dest="job_retries", type=at.int_range(0, 255), default=2,
                   help="with --via: retries of the meter")
    add_publish_arguments(u)
    u.set_defaults(fn=cmd_upgrade)

    up = sub.add_parser("upload", help="upload an image into the free slot (resumes)")
    _device_args(up)
    up.add_argument("image", type=Path)
    up.add_argument("--slot", type=at.count, default=None, help="SMP image number (default 1; 3 for a native "
                    "firmware image, detected from its KIND TLV)")
    up.add_argument("--upgrade", action="store_true", help="device refuses versions not newer than the running one")
    up.set_defaults(fn=cmd_upload)

    t = sub.add_parser("test", help="mark an uploaded image to boot once on the next reset")
    _device_args(t)
    t.add_argument("image", type=Path, nargs="?", help="the image file (its hash TLV is used)")
    t.add_argument("--hash", type=at.image_hash, help="the image hash in hex instead of a file")
    t.add_argument("--permanent", action="store_true", help="switch for good without a trial (dangerous)")
    t.set_defaults(fn=cmd_test)

    e = sub.add_parser("erase", help="erase the free slot")
    _device_args(e)
    e.add_argument("--slot", type=at.count, default=1)
    e.set_defaults(fn=cmd_erase)

    d = sub.add_parser("deploy", help="install meterota on a real board (mpremote): boot stage, runtime, "
                       "configuration, factory image in slot A")
    d.add_argument("--port", required=True, help="the board's REPL port (USB or UART)")
    d.add_argument("--board", required=True, help="esp32 or rp2")
    d.add_argument("--variant", help="esp32: partitions|stock; rp2: pico|pico_w|pico2|pico2_w")
    d.add_argument("--id", required=True, type=at.device_id, help="device id (e.g. the meter's serial number)")
    d.add_argument("--role", default="meter", choices=["meter", "concentrator"])
    d.add_argument("--hmac-key", type=_hexkey, help="per-device HMAC key (hex); default: a new random one")
    d.add_argument("--pubkey-from", type=at.input_file, help="accept only images signed with this Ed25519 key's pair")
    d.add_argument("--serial", default="stdin", help="SMP serial link: stdin (USB/UART0) or uart:ID:TX:RX[:BAUD]")
    d.add_argument("--wifi-ssid")
    d.add_argument("--wifi-key")
    d.add_argument("--self-confirm", action="store_true", help="the device confirms itself after its self-test")
    d.add_argument("--allow-downgrade", action="store_true")
    d.add_argument("--image", type=Path, help="factory image for slot A (default: the runtime as --version)")
    d.add_argument("--version", default="1.0.0", help="version of the built factory image")
    d.add_argument("--sign-key", type=at.input_file, help="sign the built factory image with this key")
    d.set_defaults(fn=cmd_deploy)

    mt = sub.add_parser("meters", help="a concentrator's meters: link, reachability, version, state")
    _device_args(mt)
    mt.set_defaults(fn=cmd_meters)

    jb = sub.add_parser("job", help="jobs on a concentrator").add_subparsers(dest="job_cmd", required=True)
    jc = jb.add_parser("create", help="store IMAGE on the concentrator and upgrade its meters")
    _device_args(jc)
    jc.add_argument("image", type=Path)
    jc.add_argument("--meters", help="comma-separated meter ids (default: all)")
    jc.add_argument("--priority", type=at.int_range(0, 255), default=0, help="higher runs first (0-255)")
    jc.add_argument("--job-retries", dest="job_retries", type=at.int_range(0, 255), default=2,
                    help="retries per meter")
    jc.add_argument("--duration", type=at.int_range(1, 2**31 - 1), default=3600,
                    help="seconds before pending meters end UNREACHABLE")
    jc.add_argument("--not-before", type=at.int_range(0, 2**31 - 1), help="window start (epoch seconds)")
    jc.add_argument("--not-after", type=at.int_range(0, 2**31 - 1), help="window end (epoch seconds)")
    jc.add_argument("--parallel", type=at.int_range(1, 64), metavar="K", help="meters worked on at once "
                    "(default: the concentrator's `parallel`, 8)")
    jc.add_argument("--mode", choices=["auto", "multicast", "unicast"], help="how the image reaches the meters "
                    "(default auto: one multicast session on a shared medium with 2 or more targets)")
    jc.add_argument("--wait", action="store_true", help="wait for the job, then verify and record its results")
    jc.add_argument("--wait-timeout", type=at.positive_float, default=3600.0)
    jc.add_argument("--campaign")
    add_publish_arguments(jc)
    for name, hlp in (("status", "job status (all jobs, or one)"), ("cancel", "cancel a job"),
                      ("results", "per-meter results, relayed records verified and recorded")):
        jp = jb.add_parser(name, help=hlp)
        _device_args(jp)
        jp.add_argument("job", type=at.count, nargs="?" if name == "status" else None)
        jp.add_argument("--campaign")
        if name == "results":
            add_publish_arguments(jp)
    jb.choices["create"].set_defaults(fn=cmd_job)
    for name in ("status", "cancel", "results"):
        jb.choices[name].set_defaults(fn=cmd_job)

    ks = sub.add_parser("keys", help="the device HMAC key registry").add_subparsers(dest="keys_cmd", required=True)
    ky = ks.add_parser("add", help="register (or replace) a device's HMAC key")
    ky.add_argument("device", type=at.device_id)
    ky.add_argument("hexkey", type=_hexkey)
    ky.set_defaults(fn=cmd_keys)
    kl = ks.add_parser("list", help="devices with a registered key")
    kl.set_defaults(fn=cmd_keys_list)

    from .campaign.cli import add_parsers, campaign_device_defaults

    add_parsers(sub, campaign_device_defaults)

    from .cli_events import add_parser as add_events_parser

    add_events_parser(sub)

    r = sub.add_parser("records", help="list recorded upgrade outcomes; `records import [SPOOL]` records the "
                       "outcomes a locked database could not take")
    r.add_argument("action", nargs="?", choices=["import"])
    r.add_argument("spool", nargs="?", help="the spool file (default: beside the database, DB.spool)")
    r.add_argument("--key", type=_hexkey, help="HMAC key to verify spooled records with (default: the registry)")
    r.add_argument("--device")
    r.add_argument("--limit", type=at.positive_int, default=50)
    r.set_defaults(fn=cmd_records)
    return p


class _QuietPipe:
    """stdout that goes quiet when its reader has gone (`meterota info | head -2`):
    the rest of the output is dropped, without a traceback, and the command
    finishes what it is doing (an upgrade is not cut in half, its outcome is
    still recorded) and exits with its own code."""

    def __init__(self, f: Any):
        self._f = f
        self.gone = False

    def write(self, s: str) -> int:
        if not self.gone:
            try:
                return int(self._f.write(s))
            except BrokenPipeError:
                self._went()
        return len(s)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._f.flush()
            except BrokenPipeError:
                self._went()

    def _went(self) -> None:
        self.gone = True
        # What is still buffered is flushed at exit: into /dev/null, not into the closed pipe.
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._f.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def main(argv: list[str] | None = None) -> int:
    saved = sys.stdout
    guard = saved if isinstance(saved, _QuietPipe) else _QuietPipe(saved)
    sys.stdout = guard  # type: ignore[assignment]
    try:
        return _main(argv)
    finally:
        guard.flush()
        sys.stdout = saved


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "command", None) == "test" and not (args.image or args.hash):
        parser.error("test needs an IMAGE or --hash")
    if getattr(args, "command", None) == "sim":
        try:
            at.state_dir(str(args.dir))
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument --dir: {e}")
    try:
        return int(args.fn(args))
    except MeterotaError as e:
        print(f"meterota: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("meterota: interrupted", file=sys.stderr)
        return 130
    # Whatever escaped the commands' own checks is still one line with a documented code.
    except sqlite3.Error as e:
        from .store import default_path

        print(f"meterota: error: records database {args.db or default_path()}: {e}", file=sys.stderr)
        return errors.EXIT_RECORDS
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"meterota: error: {where}{e.strerror or e}", file=sys.stderr)
        return errors.EXIT_FAILURE
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback with -v
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"meterota: error: internal error: {type(e).__name__}: {e} (-v shows the traceback)", file=sys.stderr)
        return errors.EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
