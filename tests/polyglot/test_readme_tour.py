"""The README's tour, run as written against a fresh server on the embedded sandbox (`make run`).

Its commands run in order from the repository root, with the README's port replaced by the
server's; each prints what the README shows under it, but for what varies from run to run
(request ids, rented numbers, times) and the width of the columns around them.
"""

from __future__ import annotations

import json
import re

from tests.docs import README, console, section
from tests.polyglot import documented, serving

_VARIES = re.compile(
    r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}"  # request ids, Plivo's api_id
    r"|\+\d{8,15}"  # rented numbers, E.164
    r"|\d{4}-\d\d-\d\dT[\d:.]+Z"  # times
)


def _steady(output: str) -> list[str]:
    """`output`'s lines with what varies from run to run masked and runs of blanks as one."""
    return [" ".join(_VARIES.sub("*", line).split()) for line in output.splitlines()]


async def test_the_readme_tour_runs_as_written() -> None:
    steps = console(section(README, "A tour"))
    cli = [command.split()[1] for command, _ in steps if command.startswith(".venv/bin/numbersvc ")]
    assert {"list", "stream", "get", "rent"} <= set(cli)
    curls = [command for command, _ in steps if command.startswith("node_modules/.bin/buf curl ")]
    assert curls
    assert len(cli) + len(curls) == len(steps), "every command of the tour is run here"
    async with serving({}) as port:
        for command, shown in steps:
            printed = await documented(command, port)
            if command in curls:
                assert json.loads(printed), command
            else:
                assert shown, f"the README shows what {command!r} prints"
                assert _steady(printed) == _steady(shown), command
