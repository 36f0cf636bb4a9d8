"""A real PostgreSQL server for the tests: Debian's binaries (`make test` installs
the postgresql package), a cluster made by initdb in a temporary folder, reached
only through a unix socket there (listen_addresses is empty: no TCP at all).

initdb refuses to run as root, so as root the cluster belongs to the `postgres`
user the Debian package creates. Clients log in as `meterota` with a password
(scram-sha-256), so wrong credentials are refused like on a real head-end; the
superuser connects by trust over the socket to create one database per test."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

PASSWORD = "meterota-test"
PORT = 5432  # the socket is in our own folder, so the number clashes with nothing


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path:
        return path
    raise RuntimeError(f"PostgreSQL's {name} not found: install Debian's postgresql package (make test does)")


class PgServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="meterota-pg-"))
        self.data = self.dir / "data"
        self.sock = str(self.dir)
        self.log = self.dir / "server.log"
        self.user: str | None = "postgres" if os.geteuid() == 0 else None
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o755)
        self.superuser = self.user or pwd.getpwuid(os.geteuid()).pw_name

    def _as_owner(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        full = (["runuser", "-u", self.user, "--"] if self.user else []) + list(cmd)
        return subprocess.run(full, capture_output=True, text=True, check=True, timeout=120)

    def init(self) -> None:
        self._as_owner(_bin("initdb"), "-D", str(self.data), "--no-locale", "-E", "UTF8", "-A", "trust",
                       "-U", self.superuser, "--no-sync")
        (self.data / "pg_hba.conf").write_text(
            f"local all {self.superuser} trust\nlocal all all scram-sha-256\n")
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(f"listen_addresses = ''\nunix_socket_directories = '{self.sock}'\nport = {PORT}\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
        self.start()
        self.psql(f"CREATE ROLE meterota LOGIN PASSWORD '{PASSWORD}'")

    def start(self) -> None:
        self._as_owner(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_owner(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def psql(self, sql: str, db: str = "postgres") -> str:
        return self._as_owner(_bin("psql"), "-h", self.sock, "-p", str(PORT), "-U", self.superuser, "-d", db,
                              "-v", "ON_ERROR_STOP=1", "-Atc", sql).stdout

    def url(self, db: str, password: str = PASSWORD, user: str = "meterota") -> str:
        return f"postgresql://{user}:{password}@/{db}?host={self.sock}&port={PORT}"

    def new_database(self) -> str:
        """A fresh database owned by `meterota`; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name} OWNER meterota")
        return self.url(name)

    def xacts(self, url: str) -> int:
        """Committed transactions of the database of `url` (pg_stat_database, flushed)."""
        name = url.split("/")[3].split("?")[0]
        return int(self.psql(f"SELECT pg_stat_force_next_flush(); SELECT xact_commit FROM pg_stat_database "
                             f"WHERE datname='{name}'").split()[-1])

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
