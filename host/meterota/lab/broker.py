"""A real Mosquitto broker (Debian's `mosquitto` package) for tests and `make scale`:
its own configuration file in a directory of its own, a loopback port, no system
service. Optional password file (mosquitto_passwd) and a TLS listener with a
self-signed certificate (openssl). kill() pulls it like a crash; start() again
brings it back on the same ports (a restarted broker, with its persistence off:
what it had not delivered is gone, as after a real crash without a disk)."""

from __future__ import annotations

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
        lines = ["per_listener_settings false", "persistence false", "log_dest stderr",
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
        proc = self.proc

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.log.append(line.rstrip())
                if " running" in line:
                    ready.set()
            ready.set()  # exited

        threading.Thread(target=read, daemon=True, name="mosquitto-log").start()
        if not ready.wait(timeout) or proc.poll() is not None:
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
