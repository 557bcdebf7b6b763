"""docs/database.md's "Two replicas on your machine", run as written.

The commands of its `sh` block run in one bash script, in order, with two changes only: every
port of the page is replaced by one the OS picked (`tests.ports.picked_ports`: PostgreSQL and
the page's commands take a port number, not port 0), and the data folder lives in a temporary
folder. As root, `initdb` and `pg_ctl` run through `runuser -u postgres
--`, as the page says. The server binaries are Debian's (`tests/pg.py` finds them), put first
on `PATH` as the page says; `numbersvc` is this venv's.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from tests.ci import missing
from tests.pg import PostgresMissing, find_bindir
from tests.ports import picked_ports

_ROOT: Final = Path(__file__).resolve().parents[2]
_DOC: Final = _ROOT / "docs" / "database.md"
_PORTS: Final = ("55432", "8089", "50051", "50052", "9464", "9465")
_DATA: Final = "/tmp/numbersvc-pg"
_REQUEST_ID: Final = "6f1c2b7e-3d4a-4e5f-8a9b-0c1d2e3f4a5b"
_TIMEOUT_SECONDS: Final = 120


def _commands() -> list[str]:
    """The `$ ` lines of the section's `sh` block."""
    section = _DOC.read_text().partition("## Two replicas on your machine")[2]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no sh block in the section"
    return [line[2:] for line in block.group(1).splitlines() if line.startswith("$ ")]


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder the PostgreSQL user may write (root's temporary folders are its own)."""
    root = Path(tempfile.mkdtemp(prefix="numbersvc-doc-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_two_replicas_on_your_machine_as_written(folder: Path) -> None:
    try:
        bindir = find_bindir()
    except PostgresMissing as exc:
        missing(str(exc))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBERSVC_", "PLIVO_", "PG"))}
    env["PATH"] = os.pathsep.join((str(bindir), str(Path(sys.executable).parent), env["PATH"]))
    ports = dict(zip(_PORTS, map(str, picked_ports(len(_PORTS))), strict=True))
    script = _script(ports, folder / "pg")
    process = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its background servers are killed with it, whatever happens
    )
    try:
        out, _ = process.communicate(timeout=_TIMEOUT_SECONDS)
    finally:
        _stop(process, bindir, folder / "pg")
    assert process.returncode == 0, out
    # The rent on one replica and the order read on the other: the same fulfilled order (the
    # request id is also printed once before the rent is sent).
    assert len(re.findall(r"^status:\s+fulfilled$", out, re.M)) == 2, out
    assert len(re.findall(rf"^request id:\s+{_REQUEST_ID}$", out, re.M)) == 3, out
    assert 'numbersvc_store_up{store="postgresql"} 1.0' in out
    assert 'numbersvc_rate_budget_source{source="shared"} 1.0' in out


def _script(ports: dict[str, str], data: Path) -> str:
    """The section's commands with its `ports` and data folder replaced, and as root the
    server's own commands run as the PostgreSQL user."""
    documented = re.compile(rf"\b({'|'.join(ports)})\b")  # at once: no port replaced twice
    script = documented.sub(lambda port: ports[port.group(1)], "\n".join(_commands()))
    script = script.replace(_DATA, str(data))
    if os.geteuid() == 0:
        script = re.sub(r"^(initdb|pg_ctl) ", r"runuser -u postgres -- \1 ", script, flags=re.M)
    return script


def _stop(process: subprocess.Popen[str], bindir: Path, data: Path) -> None:
    """Whatever the script left running: its process group, and the database."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if (data / "postmaster.pid").exists():
        stop = [str(bindir / "pg_ctl"), "-D", str(data), "stop", "-m", "immediate"]
        if os.geteuid() == 0:
            stop = ["runuser", "-u", "postgres", "--", *stop]
        subprocess.run(stop, capture_output=True, timeout=60, check=False)
