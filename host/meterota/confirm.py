"""Confirmation records: the device's HMAC-SHA256-authenticated statement of
how a test ended. Verified over the exact bytes received (never re-encoded),
so a record relayed by a concentrator verifies the same way."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import cbor2

from .errors import ConfirmationError

FIELDS = ("id", "seq", "res", "rsn", "hash", "ver", "prev", "boots", "t")


@dataclass(frozen=True)
class Confirmation:
    raw: bytes
    mac: bytes
    device_id: str
    seq: int
    result: str  # "OK" or "KO"
    reason: str
    image_hash: bytes
    version: str
    previous_version: str
    boots: int
    time: int

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device_id, "seq": self.seq, "result": self.result, "reason": self.reason,
                "hash": self.image_hash.hex(), "version": self.version, "previous": self.previous_version,
                "boots": self.boots, "time": self.time, "record": self.raw.hex(), "mac": self.mac.hex()}


def mac_of(key: bytes, raw: bytes) -> bytes:
    return hmac.new(key, raw, hashlib.sha256).digest()


def verify(raw: bytes, mac: bytes, key: bytes, *, device_id: str | None = None,
           image_hash: bytes | None = None, version: str | None = None, after_seq: int | None = None) -> Confirmation:
    """Check the MAC, then that the record is about what we expect. Raises ConfirmationError."""
    if not hmac.compare_digest(mac_of(key, raw), bytes(mac)):
        raise ConfirmationError("confirmation record MAC does not verify: wrong device key or tampered record")
    try:
        d = cbor2.loads(raw)
    except (cbor2.CBORDecodeError, ValueError) as e:
        raise ConfirmationError(f"confirmation record is not CBOR: {e}") from None
    if not isinstance(d, dict) or any(k not in d for k in FIELDS):
        raise ConfirmationError("confirmation record lacks fields")
    c = Confirmation(bytes(raw), bytes(mac), str(d["id"]), int(d["seq"]), str(d["res"]), str(d["rsn"]),
                     bytes(d["hash"]), str(d["ver"]), str(d["prev"]), int(d["boots"]), int(d["t"]))
    if c.result not in ("OK", "KO"):
        raise ConfirmationError(f"confirmation record has result {c.result!r}")
    if device_id is not None and c.device_id != device_id:
        raise ConfirmationError(f"confirmation record is from {c.device_id}, not {device_id}")
    if image_hash is not None and c.image_hash != image_hash:
        raise ConfirmationError(f"confirmation record is about image {c.image_hash.hex()[:16]}, "
                                f"not the uploaded {image_hash.hex()[:16]}")
    if version is not None and c.version != version:
        raise ConfirmationError(f"confirmation record reports version {c.version}, expected {version}")
    if after_seq is not None and c.seq <= after_seq:
        raise ConfirmationError(f"confirmation record #{c.seq} is not newer than #{after_seq}: a replay or a stale record")
    return c


def check_outcome(result: str, conf: Confirmation | None, device_id: str, image_hash: str) -> None:
    """The one rule every path obeys before it may say OK (direct, native
    firmware, already running, relayed, field): an OK needs a verified record
    (a Confirmation only comes out of verify()) that is an OK of this device
    for this image. Freshness is the store's part (Store.record)."""
    if result != "OK":
        return
    if conf is None:
        raise ConfirmationError(f"{device_id}: no verified confirmation record says OK")
    if conf.result != "OK" or conf.device_id != device_id or conf.image_hash.hex() != image_hash:
        raise ConfirmationError(f"{device_id}: the verified record (#{conf.seq}: {conf.result} for "
                                f"{conf.image_hash.hex()[:16]}) does not say OK for this image")
