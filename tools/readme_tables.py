"""Rewrite the generated tables in README.md (`make readme`); tests keep them in step."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from numbersvc import config, errors

README = Path(__file__).resolve().parents[1] / "README.md"
TABLES: dict[str, Callable[[], str]] = {
    "errors-table": errors.markdown_table,
    "settings-table": config.markdown_table,
}


def rewrite(text: str) -> str:
    """Return `text` with every marked table replaced by its generated form."""
    for name, render in TABLES.items():
        pattern = re.compile(rf"(<!-- {name}:[^\n]*-->\n).*?(\n<!-- /{name} -->)", re.DOTALL)
        # A replacement string would read backslashes in the table as escapes.
        text, count = pattern.subn(_filler(render()), text)
        if count != 1:
            sys.exit(f"README.md: expected one {name} block, found {count}")
    return text


def _filler(table: str) -> Callable[[re.Match[str]], str]:
    return lambda match: match.group(1) + table + match.group(2)


if __name__ == "__main__":
    README.write_text(rewrite(README.read_text()))
