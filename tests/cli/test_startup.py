"""`numbersvc serve` that cannot start: one `error:` line naming the setting, exit 2.

Real processes: a first server holds its ports, a second one is pointed at them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import urllib.request
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

_SERVING = re.compile(rb"serving on 127\.0\.0\.1:(\d+)")
_METRICS = re.compile(rb"metrics on http://127\.0\.0\.1:(\d+)/metrics")
_TIMEOUT_SECONDS = 30


async def _start(env: Mapping[str, str], *args: str) -> asyncio.subprocess.Process:
    """`numbersvc serve` with none of this machine's settings, only `env`'s and `args`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PLIVO_", "NUMBERSVC_"))}
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "numbersvc", "serve", "--drain-seconds", "0", *args),
        env={**clean, "NUMBERSVC_LEDGER_PATH": ":memory:", **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def _fails(env: Mapping[str, str], *args: str) -> str:
    """Start a server that must fail; return its stderr after checking exit 2, no traceback."""
    process = await _start(env, *args)
    _, err = await asyncio.wait_for(process.communicate(), timeout=_TIMEOUT_SECONDS)
    text = err.decode()
    assert process.returncode == 2, text
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    return errors[0]


@contextlib.asynccontextmanager
async def _first_server() -> AsyncIterator[tuple[int, int, str]]:
    """A server on free ports; yields its gRPC and metrics ports and its start-up lines."""
    process = await _start({}, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0")
    assert process.stderr is not None
    seen = b""
    try:
        async with asyncio.timeout(_TIMEOUT_SECONDS):
            while not (serving := _SERVING.search(seen)):
                line = await process.stderr.readline()
                assert line, seen.decode()
                seen += line
        metrics = _METRICS.search(seen)
        assert metrics is not None, seen.decode()
        yield int(serving.group(1)), int(metrics.group(1)), seen.decode()
    finally:
        process.kill()
        await process.wait()


async def test_a_taken_grpc_port_names_numbersvc_listen() -> None:
    async with _first_server() as (port, _, _):
        line = await _fails({}, "--listen", f"127.0.0.1:{port}", "--metrics-listen", "off")
    assert f"NUMBERSVC_LISTEN: cannot listen on 127.0.0.1:{port}" in line
    assert "NUMBERSVC_LISTEN or --listen" in line


async def test_a_taken_metrics_port_names_numbersvc_metrics_listen() -> None:
    async with _first_server() as (_, metrics_port, _):
        line = await _fails(
            {"NUMBERSVC_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"}, "--listen", "127.0.0.1:0"
        )
    assert f"NUMBERSVC_METRICS_LISTEN: cannot listen on 127.0.0.1:{metrics_port}" in line
    assert "Address already in use" in line


async def test_a_metrics_host_that_does_not_resolve_says_so() -> None:
    # `.invalid` never resolves (RFC 2606). The line read "Unknown error -2 (another numbersvc?)".
    address = "no-such-host.invalid:0"
    line = await _fails({"NUMBERSVC_METRICS_LISTEN": address}, "--listen", "127.0.0.1:0")
    assert f"NUMBERSVC_METRICS_LISTEN: cannot listen on {address}: " in line
    assert "Unknown error" not in line
    assert "another numbersvc" not in line
    assert "not known" in line or "resolution" in line, line


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("NUMBERSVC_CALLERS_FILE", "{tmp}/absent.json", "NUMBERSVC_CALLERS_FILE: "),
        ("NUMBERSVC_LEDGER_PATH", "{tmp}", "NUMBERSVC_LEDGER_PATH: cannot open the order ledger"),
        ("NUMBERSVC_TLS_CERT", "{tmp}/absent.pem", "NUMBERSVC_TLS_CERT: cannot read"),
    ],
)
async def test_a_file_that_cannot_be_used_names_its_setting(
    setting: str, value: str, expected: str, tmp_path: Path
) -> None:
    env = {setting: value.format(tmp=tmp_path), "NUMBERSVC_METRICS_LISTEN": "off"}
    if setting == "NUMBERSVC_TLS_CERT":
        key = tmp_path / "key.pem"
        key.write_text("present, so the missing certificate is what fails\n")
        env["NUMBERSVC_TLS_KEY"] = str(key)
    line = await _fails(env, "--listen", "127.0.0.1:0")
    assert expected in line


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=_TIMEOUT_SECONDS) as response:
        data: dict[str, Any] = json.load(response)
    return data


async def test_start_up_prints_the_embedded_sandboxs_control_command() -> None:
    async with _first_server() as (_, _, lines):
        found = re.search(
            r"sandbox controls .*: curl -s (http://127\.0\.0\.1:\d+/__sandbox/info)$", lines, re.M
        )
        assert found is not None, lines
        # The command works as printed: the sandbox answers with its state.
        info = await asyncio.to_thread(_get_json, found.group(1))
    assert info["seed"] == 7
    assert info["groups"] > 0
