"""Cross-language tests: clients in other languages against a real numbersvc.

They need Node.js (20 or later) on PATH and `node_modules` installed from the committed lock
file (`make node_modules/.installed`; `make pytest` and `make test` do it). A missing `node`
fails these tests rather than skipping them: CI has it, and a skip would hide a broken mesh.
The Go and Java clients need Go, and a JDK with Maven (`make clients` builds them; `make
pytest` runs it first): a missing one fails under `CI=true` and skips its test elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from tests.ports import announced

_SERVING = re.compile(rb"serving on 127\.0\.0\.1:(\d+)")
_START_TIMEOUT_SECONDS = 20
_ROOT = Path(__file__).resolve().parents[2]
_DOCUMENTED_ADDRESS = "127.0.0.1:50051"  # what `make run` listens on
_COMMAND_TIMEOUT_SECONDS = 60


@contextlib.asynccontextmanager
async def serving(env: Mapping[str, str]) -> AsyncIterator[int]:
    """A `numbersvc serve` process with `env`'s settings (else its embedded sandbox); its port.

    None of this machine's settings, an in-memory ledger and no metrics port; killed after.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PLIVO_", "NUMBERSVC_"))}
    clean["NUMBERSVC_LEDGER_PATH"] = ":memory:"
    clean["NUMBERSVC_METRICS_LISTEN"] = "off"  # no fixed port to fight over with other servers
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "numbersvc", "serve", "--listen", "127.0.0.1:0"),
        env={**clean, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with announced(process, _SERVING, _START_TIMEOUT_SECONDS) as serving_on:
        yield int(serving_on.group(1))


async def documented(command: str, port: int, **env: str) -> str:
    """Run a documented shell command from the repository root against the server on `port`.

    The docs' commands call `make run`'s address: it becomes `port`, in the command and as the
    CLI's target. Its stdout, or fail with its stderr.
    """
    process = await asyncio.create_subprocess_shell(
        command.replace(_DOCUMENTED_ADDRESS, f"127.0.0.1:{port}"),
        cwd=_ROOT,
        env={**os.environ, "NUMBERSVC_TARGET": f"127.0.0.1:{port}", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return (await finished(process, command, _COMMAND_TIMEOUT_SECONDS)).decode()


async def finished(process: asyncio.subprocess.Process, what: str, seconds: float) -> bytes:
    """The stdout of `process` once it exits 0 within `seconds`; else killed, failing with stderr.

    `what` names it in the failure.
    """
    try:
        out, err = await asyncio.wait_for(process.communicate(), seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"{what} ran over {seconds} s") from None
    assert process.returncode == 0, f"{what} exited {process.returncode}:\n{err.decode()}"
    return out
