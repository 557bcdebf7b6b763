"""A throwaway PostgreSQL cluster for the tests: Debian's server binaries, a temporary data
directory, a port the OS picked, removed afterwards.

PostgreSQL refuses to run as root, so as root (CI) the server runs as the `postgres` user that
Debian's package creates (`runuser`); as anyone else it runs as that user. Settings are for
speed only (`fsync=off`): nothing here must survive a crash of the machine.

The cluster trusts local and loopback connections, except for one role (`PASSWORD_ROLE`) that
must give a password over TCP, so the tests can prove what a password reaches and where it
must never appear.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psycopg

from numbersvc.ledger import pgschema
from tests.ports import picked_ports

__all__ = ["PASSWORD_ROLE", "Cluster", "PostgresMissing", "find_bindir", "running_cluster"]

PASSWORD_ROLE: Final = "numbersvc_pw"
_DEBIAN_ROOT: Final = Path("/usr/lib/postgresql")
_START_ATTEMPTS: Final = 5
_START_TIMEOUT_SECONDS: Final = 60
# Rules are matched in order: the password role over TCP first, then everyone is trusted.
_HBA: Final = f"""\
local all all trust
host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
"""


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine (`make pytest` installs them)."""


def find_bindir() -> Path:
    """Return the folder holding `initdb` and `pg_ctl`: Debian's newest, else the PATH's.

    Raises:
        PostgresMissing: neither exists.
    """
    versions = sorted(
        (int(p.parent.parent.name), p.parent)
        for p in _DEBIAN_ROOT.glob("*/bin/initdb")
        if p.parent.parent.name.isdigit()
    )
    if versions:
        return versions[-1][1]
    initdb = shutil.which("initdb")
    if initdb is None:
        raise PostgresMissing(
            f"no PostgreSQL server: no {_DEBIAN_ROOT}/<version>/bin/initdb and no initdb on PATH"
            " (`make pytest` installs Debian's postgresql package when run as root)"
        )
    return Path(initdb).parent


@dataclass
class Cluster:
    """A running cluster: where it listens and how to reach one of its databases."""

    bindir: Path
    root: Path
    port: int
    user: str

    @property
    def data(self) -> Path:
        """The data directory."""
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        """Where the server's Unix socket lives."""
        return self.root / "run"

    def url(self, dbname: str = "postgres", *, user: str = "postgres") -> str:
        """A libpq URL to `dbname` over loopback TCP (how the server under test connects)."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """A blocking, autocommitting connection to `dbname`, for set-up and checks."""
        return psycopg.connect(self.url(dbname), autocommit=True)

    def create_schema(self, *, migrated: bool = True) -> str:
        """A new schema of its own for one test; return a URL whose search path is it.

        A schema costs a few milliseconds where a database copied from a template costs a
        third of a second; tests in different schemas see nothing of each other.
        """
        name = f"t_{uuid.uuid4().hex[:16]}"
        with self.connect() as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        url = f"{self.url()}?options=-csearch_path%3D{name}"
        if migrated:
            # In a thread of its own: an async fixture may ask for this inside its loop.
            with concurrent.futures.ThreadPoolExecutor(1) as thread:
                thread.submit(asyncio.run, _migrate(url)).result()
        return url

    def with_password_role(self, url: str, *, password: str | None) -> str:
        """`url` as `PASSWORD_ROLE`, with `password` in it or none (libpq then reads PGPASSWORD)."""
        return url.replace(
            "://postgres@", f"://{PASSWORD_ROLE}{':' + password if password else ''}@"
        )

    def set_password(self) -> str:
        """Give `PASSWORD_ROLE` a new random password and return it."""
        password = f"pw-{uuid.uuid4().hex}"
        with self.connect() as conn:
            conn.execute(f"ALTER ROLE {PASSWORD_ROLE} PASSWORD '{password}'")
        return password

    def drop_schema(self, url: str) -> None:
        """Drop the schema behind a `create_schema` URL, with everything in it."""
        name = url.rpartition("%3D")[2]
        with self.connect() as conn:
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `pg_ctl` on this cluster as its owner."""
        return _run(self.user, [str(self.bindir / "pg_ctl"), "-D", str(self.data), *args])

    def start(self) -> None:
        """Start the server on `self.port`; raise with its log when it does not come up."""
        options = " ".join(
            (
                f"-p {self.port}",
                f"-k {self.socket_dir}",
                "-c listen_addresses=127.0.0.1",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=300",
            )
        )
        log = self.root / "server.log"
        done = self.pg_ctl(
            "start", "-w", "-t", str(_START_TIMEOUT_SECONDS), "-l", str(log), "-o", options
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{done.stdout}{done.stderr}{_tail(log)}")

    def stop(self) -> None:
        """Stop the server at once (`immediate`: its data is thrown away anyway)."""
        self.pg_ctl("stop", "-m", "immediate", "-w")


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        return log.read_text()[-4000:]
    return ""


def _run(user: str, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` as `user`: through `runuser` when we are root, directly otherwise."""
    if os.geteuid() == 0:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=_START_TIMEOUT_SECONDS, check=False
    )


def _port_taken(log: Path) -> bool:
    return bool(re.search(r"could not bind|Address already in use", _tail(log)))


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    """Create and start a cluster, with the migrated template database; remove it after.

    Raises:
        PostgresMissing: no server binaries.
        RuntimeError: the cluster did not start (its log is in the message).
    """
    bindir = find_bindir()
    user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    root = Path(tempfile.mkdtemp(prefix="numbersvc-pg-"))
    try:
        cluster = Cluster(bindir, root, 0, user)
        cluster.socket_dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(root, user)
            shutil.chown(cluster.socket_dir, user)
        done = _run(
            user,
            [
                str(bindir / "initdb"),
                *("-D", str(cluster.data), "-A", "trust", "-U", "postgres"),
                *("--no-sync", "--no-instructions", "-E", "UTF8", "--locale=C"),
            ],
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}{done.stderr}")
        (cluster.data / "pg_hba.conf").write_text(_HBA)
        _start_on_a_free_port(cluster)
        try:
            _prepare(cluster)
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _start_on_a_free_port(cluster: Cluster) -> None:
    """Start on a port the OS picked; another process may take it first, so try a few."""
    for attempt in range(_START_ATTEMPTS):
        [cluster.port] = picked_ports(1)
        try:
            cluster.start()
            return
        except RuntimeError:
            if attempt + 1 == _START_ATTEMPTS or not _port_taken(cluster.root / "server.log"):
                raise


def _prepare(cluster: Cluster) -> None:
    """The role that must give a password over TCP."""
    with cluster.connect() as conn:
        conn.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD 'unused'")


async def _migrate(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await pgschema.migrate(conn)
