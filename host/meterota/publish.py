"""The event stream on an MQTT broker (paho-mqtt): the publisher that drains the
records store's outbox, and the subscriber behind `meterota events --subscribe`.

Publisher: one thread owns one paho client and drives its network loop itself.
It reads the outbox in row order, publishes a window of rows at QoS 1 and marks
a row sent only when it and every row before it were acknowledged (PUBACK). Any
failure (refused connection, TLS, a lost link, no PUBACK in time) drops the
client; the next connection starts again from the oldest unsent row. So an
outage delays messages and may repeat a few (same id: consumers de-duplicate),
but never loses or reorders them per device. Retained progress rows superseded
by a newer one for the same campaign within a window are not sent at all.

docs/events.md describes topics, payloads and the delivery guarantees.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .events import BrokerURL
from .store import Store

log = logging.getLogger("meterota.publish")

WINDOW = 100          # rows in flight at once
ACK_TIMEOUT = 30.0    # seconds for a window's PUBACKs before the link counts as broken
CONNECT_TIMEOUT = 10.0
KEEPALIVE = 15
BACKOFF = (0.25, 5.0)  # reconnect delay: doubles from the first to the second
DRAIN_LEASE = 15.0     # seconds the drain lease holds without renewal (renewed with each window)


class PublishError(Exception):
    """Why the broker cannot take messages now, as one readable phrase."""


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS failure: certificate verify failed ({e.verify_message or e.reason})"
    if isinstance(e, ssl.SSLError):
        return f"TLS failure: {e.reason or e}"
    if isinstance(e, ConnectionRefusedError):
        return "broker unreachable (connection refused)"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "broker unreachable (timed out)"
    if isinstance(e, socket.gaierror):
        return f"broker unreachable (unknown host: {e.strerror})"
    if isinstance(e, OSError):
        return f"broker unreachable ({e.strerror or e})"
    return f"{type(e).__name__}: {e}"


def connect(url: BrokerURL, client_id: str, *, on_message: Callable[..., None] | None = None,
            clean: bool = True, timeout: float = CONNECT_TIMEOUT) -> tuple[mqtt.Client, dict[str, Any]]:
    """A connected client (CONNACK accepted), driven by the caller's loop() calls, and
    its state dict ({"connected": bool, "acks": {mid: reason}, "session": bool}).
    PublishError with the reason when the broker cannot be reached or refuses."""
    v5 = url.protocol == "5"
    state: dict[str, Any] = {"connack": None, "connected": False, "acks": {}, "session": False}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                    clean_session=None if v5 else clean, reconnect_on_failure=False)
    c.connect_timeout = timeout
    if url.username:
        c.username_pw_set(url.username, url.password)
    if url.tls:
        try:
            c.tls_set(ca_certs=url.ca)
        except (OSError, ssl.SSLError) as e:
            raise PublishError(f"TLS failure: cannot load CA {url.ca}: {getattr(e, 'strerror', None) or e}") from None

    def on_connect(_c: Any, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        state["connack"] = rc
        state["connected"] = not rc.is_failure
        state["session"] = bool(getattr(flags, "session_present", False))

    def on_disconnect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        state["connected"] = False
        state["lost"] = str(rc)

    def on_publish(_c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        state["acks"][mid] = rc

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.on_publish = on_publish
    if on_message is not None:
        c.on_message = on_message
    c.max_inflight_messages_set(WINDOW)
    try:
        if v5:
            props = None
            if not clean:  # keep the subscription and its queued messages for an hour offline
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 3600
            c.connect(url.host, url.port, keepalive=KEEPALIVE, clean_start=clean, properties=props)
        else:
            c.connect(url.host, url.port, keepalive=KEEPALIVE)
    except (OSError, ValueError) as e:
        raise PublishError(_reason(e)) from None
    deadline = time.monotonic() + timeout
    while state["connack"] is None:
        rc = c.loop(0.1)
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS,) and state["connack"] is None:
            _close(c)
            raise PublishError(f"broker closed the connection before accepting it ({mqtt.error_string(rc)})")
        if time.monotonic() > deadline:
            _close(c)
            raise PublishError(f"no answer (CONNACK) from the broker within {timeout:g} s")
    if state["connack"].is_failure:
        _close(c)
        raise PublishError(f"broker refused the connection: {state['connack']}")
    return c, state


def _close(c: mqtt.Client) -> None:
    try:
        c.disconnect()
        c.loop(0.05)
    except Exception:  # noqa: BLE001 - closing a broken link is best effort
        pass
    try:
        sock = c.socket()
        if sock is not None:
            sock.close()
    except Exception:  # noqa: BLE001
        pass


def _dead_owner(owner: str) -> bool:
    """Whether a drain lease holder (host:pid:token) is a process of this host that is gone."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def default_client_id(role: str) -> str:
    return f"meterota-{role}-{socket.gethostname()}-{os.getpid()}"[:64]


class Publisher:
    """Drains `store`'s outbox to the broker of `url` in a thread (start/close), or in
    the caller's thread (flush)."""

    def __init__(self, store: Store, url: BrokerURL, *, warn: Callable[[str], None] | None = None,
                 note: Callable[[str], None] | None = None, window: int = WINDOW):
        self.store = store
        self.url = url
        self.window = window
        self.warn = warn or (lambda s: log.warning(s))
        self.note = note or (lambda s: log.info(s))
        self.client_id = url.client_id or default_client_id("pub")
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.holder: str | None = None  # another publisher draining the outbox now, if any
        self.sent = 0          # rows acknowledged by the broker (this process)
        self.published = 0     # PUBLISH packets sent, repeats after an outage included
        self.outages = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._state: dict[str, Any] = {}
        self._down: str | None = None  # the reason of the outage being lived through
        self._progress = threading.Condition()

    # -- thread ------------------------------------------------------------------------
    def start(self) -> "Publisher":
        self._thread = threading.Thread(target=self._run, daemon=True, name="mqtt-publisher")
        self._thread.start()
        return self

    def close(self, wait: float) -> int:
        """Wait up to `wait` seconds for the outbox to empty, stop; returns the unsent rows left."""
        deadline = time.monotonic() + wait
        with self._progress:
            while self.store.outbox_counts()["unsent"] and time.monotonic() < deadline:
                self.store.outbox_changed.set()  # wake the thread now rather than at its next poll
                self._progress.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        self._stop.set()
        self.store.outbox_changed.set()
        if self._thread is not None:
            self._thread.join()
        self._drop()
        self._release()
        return self.store.outbox_counts()["unsent"]

    def wait_drained(self, timeout: float) -> bool:
        """Wait until every row written so far is acknowledged by the broker and marked sent."""
        with self._progress:
            return self._progress.wait_for(lambda: not self.store.outbox_counts()["unsent"], timeout)

    def _run(self) -> None:
        delay = BACKOFF[0]
        while not self._stop.is_set():
            try:
                if not self.step():
                    self._idle(1.0)
                delay = BACKOFF[0]
            except Exception as e:  # noqa: BLE001 - the publisher must not die silently under a campaign
                if not isinstance(e, PublishError):
                    log.exception("publisher")
                self._drop()
                self._outage(str(e) if isinstance(e, PublishError) else f"{type(e).__name__}: {e}")
                # Let a publisher that can reach its broker drain meanwhile (another worker's).
                self._release()
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF[1])

    def _idle(self, seconds: float) -> None:
        """Wait for new rows (rows of other processes show up within `seconds`), keeping
        the connection alive (PINGREQ) meanwhile."""
        end = time.monotonic() + seconds
        while not self.store.outbox_changed.is_set() and not self._stop.is_set() and time.monotonic() < end:
            if self._client is not None and self._state.get("connected"):
                self._client.loop(0.1)
            else:
                self.store.outbox_changed.wait(max(0.0, end - time.monotonic()))

    def flush(self, timeout: float | None = None) -> int:
        """Send every unsent row in this thread; PublishError on the first failure (rows
        acknowledged before it stay sent). Returns the rows sent."""
        start = self.sent
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.step():
                if deadline is not None and time.monotonic() > deadline:
                    break
            if self.holder is not None:
                raise PublishError(f"the outbox is being sent by another publisher ({self.holder})")
        finally:
            self._drop()
            self._release()
        return self.sent - start

    # -- one window ------------------------------------------------------------------------
    def _outage(self, reason: str) -> None:
        """One warning per outage (its first reason); the rest of it goes to the log."""
        if self._down is not None:
            if reason != self._down:
                log.info("MQTT %s: %s", self.url.safe(), reason)
            return
        self.outages += 1
        self._down = reason
        self.warn(f"MQTT {self.url.safe()}: {reason}; outcomes wait in the outbox and are sent "
                  "when the broker takes them")

    def _drop(self) -> None:
        if self._client is not None:
            _close(self._client)
            self._client = None

    def _ensure(self) -> mqtt.Client:
        if self._client is None or not self._state.get("connected"):
            self._drop()
            self._client, self._state = connect(self.url, self.client_id)
            if self._down is not None:
                left = self.store.outbox_counts()["unsent"]
                self.note(f"MQTT {self.url.safe()}: connected again; sending {left} waiting messages")
                self._down = None
        return self._client

    def step(self) -> bool:
        """Publish one window of unsent rows and mark the acknowledged prefix sent.
        False when there was nothing to send."""
        self.store.outbox_changed.clear()
        if not self._claim():
            return False  # another publisher drains the outbox (its rows and ours) now
        rows = self.store.outbox_unsent(self.window)
        if not rows:
            return False
        c = self._ensure()
        newest: dict[str, int] = {}
        for r in rows:
            if r["retain"]:
                newest[r["topic"]] = r["id"]
        flight: list[tuple[int, Any]] = []
        for r in rows:
            if r["retain"] and newest[r["topic"]] != r["id"]:
                flight.append((r["id"], None))  # superseded retained state: the newer row says it all
                continue
            info = c.publish(self.url.topic(r["topic"]), r["payload"].encode(), qos=1, retain=bool(r["retain"]),
                             properties=self._props(r["msg_id"]))
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise PublishError(f"connection lost ({mqtt.error_string(info.rc)})")
            self.published += 1
            flight.append((r["id"], info))
        acks = self._state["acks"]
        deadline = time.monotonic() + ACK_TIMEOUT
        done = 0
        while True:
            while done < len(flight) and (flight[done][1] is None or flight[done][1].mid in acks):
                rc = acks.pop(flight[done][1].mid, None) if flight[done][1] is not None else None
                if rc is not None and rc.is_failure:
                    self._mark(flight[:done])
                    raise PublishError(f"broker did not take a message: {rc}")
                done += 1
            if done == len(flight):
                break
            if not self._state["connected"]:
                self._mark(flight[:done])
                raise PublishError(f"connection lost ({self._state.get('lost', 'closed')})")
            if self._stop.is_set():  # closing after its wait: what is unacknowledged stays unsent
                self._mark(flight[:done])
                return True
            if time.monotonic() > deadline:
                self._mark(flight[:done])
                raise PublishError(f"no PUBACK within {ACK_TIMEOUT:g} s")
            c.loop(0.05)
        self._mark(flight)
        return True

    def _claim(self) -> bool:
        """Hold the drain lease: one publisher at a time sends the outbox, in order."""
        holder = self.store.outbox_claim(self.owner, DRAIN_LEASE)
        if holder is not None and _dead_owner(holder):
            holder = self.store.outbox_claim(self.owner, DRAIN_LEASE, dead=holder)
        if holder != self.holder and holder is not None:
            self.note(f"the outbox is being sent by another publisher ({holder}); waiting for its lease")
        self.holder = holder
        return holder is None

    def _release(self) -> None:
        try:
            self.store.outbox_release(self.owner)
        except Exception:  # noqa: BLE001 - the database itself gone: the lease runs out by itself
            log.debug("drain lease not released", exc_info=True)

    def _mark(self, flight: list[tuple[int, Any]]) -> None:
        if not flight:
            return
        self.store.outbox_mark_sent([i for i, _ in flight])
        self.sent += sum(1 for _, info in flight if info is not None)
        with self._progress:
            self._progress.notify_all()

    def _props(self, msg_id: str) -> Properties | None:
        if self.url.protocol != "5":
            return None  # MQTT 3.1.1: the id is in the payload only
        p = Properties(PacketTypes.PUBLISH)
        p.UserProperty = [("message-id", msg_id)]
        p.ContentType = "application/json"
        return p


@contextmanager
def publishing(store: Store, url: BrokerURL | None, *, wait: float, warn: Callable[[str], None],
               note: Callable[[str], None] | None = None) -> Iterator[Publisher | None]:
    """For a command with --publish: outcomes recorded inside also go to the outbox,
    a publisher sends them as they come; at the end it waits up to `wait` seconds
    for the rest and says what is left."""
    if url is None:
        yield None
        return
    store.enable_outbox()
    pub = Publisher(store, url, warn=warn, note=note).start()
    try:
        yield pub
    finally:
        left = pub.close(wait)
        if left:
            warn(f"{left} messages not yet sent to {url.safe()}: they stay in the outbox of {store.path}; "
                 f"`meterota events flush --publish URL` sends them")


# -- the consumer ------------------------------------------------------------------------------
class Seen:
    """Message ids already handled: in memory, and with a directory, in its journal file
    (.meterota-seen) so that a restarted consumer does not write a message twice even
    after the legacy system took the file away."""

    def __init__(self, directory: Path | None):
        self.ids: set[str] = set()
        self.journal = directory / ".meterota-seen" if directory else None
        if self.journal and self.journal.exists():
            self.ids.update(x for x in self.journal.read_text().split() if x)

    def add(self, mid: str) -> bool:
        """True the first time `mid` is seen."""
        if mid in self.ids:
            return False
        self.ids.add(mid)
        return True

    def commit(self, mid: str) -> None:
        if self.journal is not None:
            with self.journal.open("a") as f:
                f.write(mid + "\n")
                f.flush()
                os.fsync(f.fileno())


def file_name(doc: dict[str, Any], ext: str) -> str:
    """Sorts in event order, is the same on every redelivery: TIME-DEVICE-ID.EXT."""
    t = str(doc.get("t") or "").replace("-", "").replace(":", "")
    dev = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(doc.get("device") or doc.get("campaign")))
    return f"{t}-{dev}-{doc['id']}.{ext}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def subscribe(url: BrokerURL, handle: Callable[[str, dict[str, Any], bool], None], *, stop: threading.Event,
              session: str | None = None, warn: Callable[[str], None], note: Callable[[str], None]) -> None:
    """Deliver every message under the URL's prefix to handle(topic, payload, retained)
    until `stop` is set; reconnects after an outage (one warning per outage). With
    `session`, a persistent session under that client id: the broker keeps QoS 1
    messages published while the consumer is away."""
    topics = [(url.topic("devices/+/upgrade"), 1), (url.topic("campaigns/+"), 1)]
    cid = session or url.client_id or default_client_id("sub")
    down: str | None = None
    delay = BACKOFF[0]

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        try:
            doc = json.loads(msg.payload)
            if not isinstance(doc, dict) or "id" not in doc:
                raise ValueError("no message id")
        except ValueError as e:
            warn(f"ignored a message on {msg.topic} that is not a meterota event ({e})")
            return
        handle(msg.topic, doc, bool(msg.retain))

    while not stop.is_set():
        try:
            c, state = connect(url, cid, on_message=on_message, clean=session is None)
        except PublishError as e:
            if down != str(e):
                down = str(e)
                warn(f"MQTT {url.safe()}: {e}; retrying")
            stop.wait(delay)
            delay = min(delay * 2, BACKOFF[1])
            continue
        delay = BACKOFF[0]
        try:
            c.on_subscribe = lambda *_a: state.__setitem__("suback", True)
            c.subscribe(topics)
            subscribed = False
            while not stop.is_set() and state["connected"]:
                c.loop(0.2)
                if not subscribed and state.get("suback"):
                    subscribed = True
                    note(f"subscribed to {url.topic('devices/+/upgrade')} and {url.topic('campaigns/+')} "
                         f"at {url.safe()}" + (" (again)" if down else ""))
                    down = None
            if not stop.is_set() and down is None:
                down = f"connection lost ({state.get('lost', 'closed')})"
                warn(f"MQTT {url.safe()}: {down}; retrying")
        finally:
            _close(c)
