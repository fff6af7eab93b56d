"""A real PostgreSQL server for the test session: `initdb` and `pg_ctl` (on PATH, /usr/local/bin, or
Debian's /usr/lib/postgresql/*/bin; `make test` installs Debian's `postgresql` where none is found) in a
temporary directory, on a free port, with trust authentication on 127.0.0.1 only. PostgreSQL refuses to
run as root, so as root the server runs as `nobody` (via runuser). Each test gets a database of its own.
Where no server can be started, the tests that need one are skipped, saying why."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


def _binary(name: str) -> str | None:
    found = shutil.which(name) or (
        f"/usr/local/bin/{name}" if os.path.exists(f"/usr/local/bin/{name}") else None
    )
    if found:
        return found
    debian = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return debian[-1] if debian else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, initdb: str, pg_ctl: str):
        self.root = Path(tempfile.mkdtemp(prefix="ember-pg-"))
        self.port = _free_port()
        self.as_user = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root and no runuser to start PostgreSQL as 'nobody'")
            shutil.chown(self.root, "nobody")
            self.as_user = [runuser, "-u", "nobody", "--"]
        self.pg_ctl = pg_ctl
        data = self.root / "data"
        self._run([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"])
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        )
        self._run(
            [pg_ctl, "-D", str(data), "-l", str(self.root / "log"), "-w", "-t", "30", "-o", opts, "start"]
        )

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run([*self.as_user, *argv], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {(done.stderr or done.stdout).strip()[-500:]}")

    def database(self) -> str:
        """A new, empty database: its SQLAlchemy URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server, or a skip that says why there is none."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("PostgreSQL tests need psycopg (pip install 'psycopg[binary]', in ember's dev extra)")
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip(
            "PostgreSQL tests need initdb and pg_ctl (Debian: apt-get install postgresql; make test does)"
        )
    try:
        server = PostgresServer(initdb, pg_ctl)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"PostgreSQL could not be started: {exc}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """A fresh database of each kind: an SQLite file, and a database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ember.db"
    return request.getfixturevalue("postgres_server").database()
