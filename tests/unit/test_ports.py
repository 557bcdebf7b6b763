"""tests/ports.py: a reserved port is one nothing else is given while the reservation lasts."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ports
from tests.ports import _claim, ephemeral_range, reserved_ports

_ROOT = Path(__file__).resolve().parents[2]


def _claimed_elsewhere(port: int) -> bool:
    """Whether another process can reserve `port` now."""
    script = f"from tests.ports import _claim; print(_claim({port}) is not None)"
    ran = subprocess.run(
        [sys.executable, "-c", script], cwd=_ROOT, capture_output=True, text=True, check=True
    )
    return ran.stdout.strip() == "True"


def test_reserved_ports_are_free_and_never_given_out_for_port_0() -> None:
    low, high = ephemeral_range()
    with reserved_ports(6) as ports:
        assert len(set(ports)) == 6
        # Outside the range the OS picks port 0 binds and outgoing connections from: a port
        # found by binding port 0 (and handed over) lies inside it, where anyone may get it.
        assert not [p for p in ports if low <= p <= high], (ports, low, high)
        for port in ports:
            with socket.socket() as server:  # as the servers bind it
                server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                server.bind(("127.0.0.1", port))


def test_a_reserved_port_is_given_to_no_other_process_until_the_block_ends() -> None:
    with reserved_ports(1) as [port]:
        assert not _claimed_elsewhere(port)
    assert _claimed_elsewhere(port)


def test_a_port_something_holds_is_not_reserved() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        lock = _claim(holder.getsockname()[1])
    assert lock is None, "a bound port was reserved"


def test_ports_come_from_above_an_ephemeral_range_that_starts_low(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1024, 60999))
    with reserved_ports(2) as taken:
        assert all(60999 < p <= 65535 for p in taken), taken
