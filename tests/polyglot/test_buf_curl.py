"""The README's `buf curl` commands, run as written against a real server.

They run from the repository root with `node_modules/.bin/buf` (what `make
node_modules/.installed` puts there), with the README's port replaced by the server's; the
one with a token runs against a server with a callers file.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

from numbersvc import callers
from tests.polyglot import serving

_ROOT = Path(__file__).resolve().parents[2]
_README_PORT = "127.0.0.1:50051"
_TIMEOUT_SECONDS = 60


def _readme_buf_curls() -> list[str]:
    """Every `$ node_modules/.bin/buf curl ...` command of the README, continuations joined."""
    text = (_ROOT / "README.md").read_text()
    commands = re.findall(r"^\$ (node_modules/\.bin/buf curl (?:.*\\\n)*.*)$", text, re.M)
    return [command.replace("\\\n", " ") for command in commands]


async def _shell(command: str, port: int, **env: str) -> str:
    process = await asyncio.create_subprocess_shell(
        command.replace(_README_PORT, f"127.0.0.1:{port}"),
        cwd=_ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), _TIMEOUT_SECONDS)
    assert process.returncode == 0, f"{command}\n{err.decode()}"
    return out.decode()


async def test_the_readme_buf_curl_commands_work(tmp_path: Path) -> None:
    commands = _readme_buf_curls()
    plain = [c for c in commands if "$TOKEN" not in c]
    with_token = [c for c in commands if "$TOKEN" in c]
    assert len(plain) == 2
    assert len(with_token) == 1
    async with serving({}) as port:
        listed = json.loads(await _shell(plain[0], port))
        assert len(listed["numberGroups"]) == 2
        methods = await _shell(plain[1], port)
        assert "numbersvc.v1.NumberGroupService/RentNumbers" in methods.split()
    file = tmp_path / "callers.json"
    token = callers.add_caller(str(file), "curl", [callers.READ])
    assert token is not None
    async with serving({"NUMBERSVC_CALLERS_FILE": str(file)}) as port:
        listed = json.loads(await _shell(with_token[0], port, TOKEN=token))
        assert len(listed["numberGroups"]) == 1
