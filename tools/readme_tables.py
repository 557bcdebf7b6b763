"""Rewrite the generated tables in docs/ (`make readme`, `make docs`); tests keep them in step.

The error table lives in docs/contract.md and the settings table in docs/configuration.md,
each between `<!-- NAME: ... -->` and `<!-- /NAME -->` markers.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from numbersvc import config, errors

DOCS = Path(__file__).resolve().parents[1] / "docs"
TABLES: dict[str, tuple[Path, Callable[[], str]]] = {
    "errors-table": (DOCS / "contract.md", errors.markdown_table),
    "settings-table": (DOCS / "configuration.md", config.markdown_table),
}


def rewrite(name: str, text: str) -> str:
    """Return `text` with the table marked `name` replaced by its generated form."""
    path, render = TABLES[name]
    pattern = re.compile(rf"(<!-- {name}:[^\n]*-->\n).*?(\n<!-- /{name} -->)", re.DOTALL)
    # A replacement string would read backslashes in the table as escapes.
    text, count = pattern.subn(_filler(render()), text)
    if count != 1:
        sys.exit(f"{path.name}: expected one {name} block, found {count}")
    return text


def _filler(table: str) -> Callable[[re.Match[str]], str]:
    return lambda match: match.group(1) + table + match.group(2)


if __name__ == "__main__":
    for table, (file, _) in TABLES.items():
        file.write_text(rewrite(table, file.read_text()))
