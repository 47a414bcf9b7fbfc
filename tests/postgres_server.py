"""A throwaway PostgreSQL server for tests: ``initdb`` into a temporary directory, ``postgres``
listening only on a Unix socket in that directory, stopped and removed by :meth:`stop`.

The server binaries come from the Debian package (``/usr/lib/postgresql/<version>/bin``, or
``initdb`` / ``pg_ctl`` on the PATH).  PostgreSQL refuses to run as root; as root the server
runs as the unprivileged user ``nobody`` through ``runuser``.  Anything that keeps it from
starting raises :class:`Unavailable` with the reason, for the test to skip on.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

_USER = "nobody"  # who runs the server when the tests run as root


class Unavailable(RuntimeError):
    """The server cannot start here (no binaries, no driver, no unprivileged user ...)."""


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise Unavailable(f"no PostgreSQL {name} (install the Debian package postgresql)")
    return found


def _free_port() -> int:
    # The port names the socket file (.s.PGSQL.<port>); a free TCP port avoids surprises
    # with a server that someone else started on the default one.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """``url``: the SQLAlchemy URL of the database ``postgres`` as superuser ``moaplan``."""

    def __init__(self) -> None:
        try:
            import psycopg2  # noqa: F401  (the driver optuna's SQLAlchemy URL names)
        except ImportError as err:
            raise Unavailable(f"no PostgreSQL driver: {err} (pip install psycopg2-binary)") from err
        self.initdb, self.pg_ctl = _binary("initdb"), _binary("pg_ctl")
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise Unavailable("running as root, and no runuser to start PostgreSQL as "
                                  f"{_USER} (it refuses to run as root)")
            self.prefix = [runuser, "-u", _USER, "--"]
        # Not pytest's tmp_path: as root that is private to root, and the server runs as nobody.
        self.root = Path(tempfile.mkdtemp(prefix="moaplan-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = _free_port()
        self.started = False
        if self.prefix:
            user = pwd.getpwnam(_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://moaplan@/postgres?host={self.root}&port={self.port}"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120,
                              cwd=self.root)

    def start(self) -> PostgresServer:
        made = self._run(self.initdb, "-D", str(self.data), "-U", "moaplan", "-A", "trust",
                         "-E", "UTF8", "--no-sync")
        if made.returncode != 0:
            self.stop()
            raise Unavailable(f"initdb failed: {(made.stderr or made.stdout).strip()[-500:]}")
        # Only the socket in our directory (listen_addresses ''), no fsync: a test database.
        options = (f"-p {self.port} -k {self.root} -c listen_addresses='' -c fsync=off "
                   "-c max_connections=50")
        up = self._run(self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.log),
                       "-w", "-t", "60", "start")
        self.started = True  # pg_ctl may have started it even if it reports a failure
        if up.returncode != 0:
            log = self.log.read_text(errors="replace")[-500:] if self.log.exists() else ""
            self.stop()
            raise Unavailable(f"PostgreSQL did not start: {up.stderr.strip()[-300:]} {log}")
        return self

    def stop(self) -> None:
        """Stop the server (fast: it is a throwaway database) and remove its directory."""
        if self.started:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
