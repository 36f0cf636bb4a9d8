"""A real Mosquitto broker (Debian's `mosquitto` package) for tests and `make scale`:
its own configuration file in a directory of its own, a loopback port, no system
service. Optional password file (mosquitto_passwd) and a TLS listener with a
self-signed certificate (openssl). kill() pulls it like a crash; start() again
brings it back on the same ports (a restarted broker, with its persistence off:
what it had not delivered is gone, as after a real crash without a disk)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed(directory: Path, cn: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate and its key for `cn` (also its IP SAN); returns (cert, key)."""
    cert, key = directory / "broker.crt", directory / "broker.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    f"/CN={cn}", "-addext", f"subjectAltName=IP:{cn}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class Mosquitto:
    def __init__(self, directory: Path, *, users: dict[str, str] | None = None, tls: bool = False):
        if not Path(MOSQUITTO).exists():
            raise FileNotFoundError("mosquitto is not installed (make mosquitto: Debian's package)")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.cert: Path | None = None
        import pwd

        # As root, mosquitto would switch to its own user, who cannot read files in our test directory.
        lines = [f"user {pwd.getpwuid(os.geteuid()).pw_name}", "per_listener_settings false", "persistence false", "log_dest stderr",
                 "log_type error", "log_type warning", "log_type notice", "log_type information",
                 "max_queued_messages 100000", "max_inflight_messages 1000",
                 f"listener {self.port} 127.0.0.1"]
        if users:
            pw = self.dir / "passwd"
            pw.write_text("")
            for u, p in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), u, p], check=True, capture_output=True)
            lines += [f"password_file {pw}", "allow_anonymous false"]
        else:
            lines.append("allow_anonymous true")
        if tls:
            self.cert, key = self_signed(self.dir)
            lines += [f"listener {self.tls_port} 127.0.0.1", f"certfile {self.cert}", f"keyfile {key}"]
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    def url(self, prefix: str = "test", *, user: str | None = None, tls: bool = False, query: str = "") -> str:
        auth = f"{user}@" if user else ""
        scheme, port = ("mqtts", self.tls_port) if tls else ("mqtt", self.port)
        return f"{scheme}://{auth}127.0.0.1:{port}/{prefix}" + (f"?{query}" if query else "")

    def start(self, timeout: float = 30.0) -> "Mosquitto":
        """Start and return once the broker says it is running (its own log line)."""
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True)
        ready = threading.Event()
        running = threading.Event()
        proc = self.proc

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.log.append(line.rstrip())
                if " running" in line:
                    running.set()
                    ready.set()
            ready.set()  # exited

        threading.Thread(target=read, daemon=True, name="mosquitto-log").start()
        if not ready.wait(timeout) or not running.is_set():
            self.stop()
            raise RuntimeError("mosquitto did not start:\n" + "\n".join(self.log[-20:]))
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TCPCut:
    """A TCP relay on a loopback port to `target`, for network cuts: cut() drops every
    connection through it and refuses new ones (accepted, then closed at once) until
    restore(). `cuts` counts the connections it dropped."""

    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        import selectors

        self.target = (host, target_port)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, 0))
        self.lsock.listen(16)
        self.port = int(self.lsock.getsockname()[1])
        self._open = True
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self.cuts = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self.lsock, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, daemon=True, name="tcp-cut")
        self._thread.start()

    def _run(self) -> None:
        import selectors

        while not self._stop.is_set():
            for key, _ in self._sel.select(0.5):
                if key.data == "wake":
                    self._wake_r.recv(64)
                    continue
                if key.data == "accept":
                    c, _ = self.lsock.accept()
                    if not self._open:
                        c.close()
                        continue
                    try:
                        u = socket.create_connection(self.target, timeout=5)
                    except OSError:
                        c.close()
                        continue
                    with self._lock:
                        self._pairs.append((c, u))
                    self._sel.register(c, selectors.EVENT_READ, u)
                    self._sel.register(u, selectors.EVENT_READ, c)
                    continue
                src: socket.socket = key.fileobj  # type: ignore[assignment]
                dst: socket.socket = key.data
                try:
                    data = src.recv(65536)
                    if data:
                        dst.sendall(data)
                        continue
                except OSError:
                    pass
                self._drop(src)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            for pair in list(self._pairs):
                if s in pair:
                    self._pairs.remove(pair)
                    for x in pair:
                        try:
                            self._sel.unregister(x)
                        except (KeyError, ValueError):
                            pass
                        x.close()

    def cut(self) -> None:
        self._open = False
        with self._lock:
            pairs = list(self._pairs)
        for c, _ in pairs:
            self.cuts += 1
            try:
                c.shutdown(socket.SHUT_RDWR)  # the relay thread sees EOF and drops the pair
            except OSError:
                pass
        self._wake_w.send(b"x")

    def restore(self) -> None:
        self._open = True

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._thread.join()
        self.lsock.close()
