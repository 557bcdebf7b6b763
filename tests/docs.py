"""What the tests of the documentation share: where the files are, their headings, a section.

README.md is the front door; the manual is in docs/, one topic per file. A test that holds a
document to the code reads it through `section`, which fails when the heading is gone: text that
moves takes its test along, and no test passes on a file that no longer has the text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[1]
README: Final = ROOT / "README.md"
DOCS: Final = ROOT / "docs"

_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^(#{1,6}) +(.+?) *#*$")


def headings(text: str) -> list[tuple[int, str, int]]:
    """Every Markdown heading of `text` outside code blocks: (level, title, line index)."""
    found: list[tuple[int, str, int]] = []
    in_code = False
    for index, line in enumerate(text.splitlines()):
        if _FENCE.match(line):
            in_code = not in_code
        elif not in_code and (match := _HEADING.match(line)):
            found.append((len(match.group(1)), match.group(2), index))
    return found


def section(path: Path, title: str) -> str:
    """The text under the heading `title` in `path`, down to the next heading of its level or above.

    Fails, naming the file, when `path` has no such heading or more than one.
    """
    text = path.read_text()
    lines = text.splitlines()
    found = headings(text)
    matches = [i for i, (_, name, _) in enumerate(found) if name == title]
    assert len(matches) == 1, f"{path.relative_to(ROOT)}: expected one heading {title!r}"
    level, _, start = found[matches[0]]
    end = next((line for lvl, _, line in found[matches[0] + 1 :] if lvl <= level), len(lines))
    return "\n".join(lines[start + 1 : end]) + "\n"


def console(text: str) -> list[tuple[str, str]]:
    """Every `$ ` command of the console blocks in `text`, with the output shown under it.

    A command's continuation lines (after a trailing backslash) are joined into one line.
    """
    steps: list[list[str]] = []
    in_console = continued = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_console = not in_console and line.strip() == "```console"
            continued = False
        elif not in_console:
            continue
        elif continued:
            steps[-1][0] += " " + line.strip().removesuffix("\\").rstrip()
            continued = line.endswith("\\")
        elif line.startswith("$ "):
            steps.append([line[2:].removesuffix("\\").rstrip(), ""])
            continued = line.endswith("\\")
        elif steps:
            steps[-1][1] += line + "\n"
    return [(command, shown) for command, shown in steps]
