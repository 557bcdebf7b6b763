"""docs/clients.md's `buf curl` commands, run as written against a real server.

They run from the repository root with `node_modules/.bin/buf` (what `make
node_modules/.installed` puts there), with the documented port replaced by the server's; the
one with a token runs against a server with a callers file.
"""

from __future__ import annotations

import json
from pathlib import Path

from numbersvc import callers
from tests.docs import DOCS, console, section
from tests.polyglot import documented, serving


def _documented_buf_curls() -> list[str]:
    """Every `$ node_modules/.bin/buf curl ...` command of docs/clients.md's "buf curl"."""
    steps = console(section(DOCS / "clients.md", "buf curl"))
    return [command for command, _ in steps if command.startswith("node_modules/.bin/buf curl ")]


async def test_the_documented_buf_curl_commands_work(tmp_path: Path) -> None:
    commands = _documented_buf_curls()
    plain = [c for c in commands if "$TOKEN" not in c]
    with_token = [c for c in commands if "$TOKEN" in c]
    assert len(plain) == 2
    assert len(with_token) == 1
    async with serving({}) as port:
        listed = json.loads(await documented(plain[0], port))
        assert len(listed["numberGroups"]) == 2
        methods = await documented(plain[1], port)
        assert "numbersvc.v1.NumberGroupService/RentNumbers" in methods.split()
    file = tmp_path / "callers.json"
    token = callers.add_caller(str(file), "curl", [callers.READ])
    assert token is not None
    async with serving({"NUMBERSVC_CALLERS_FILE": str(file)}) as port:
        listed = json.loads(await documented(with_token[0], port, TOKEN=token))
        assert len(listed["numberGroups"]) == 1
