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
        table = render()
        text, count = pattern.subn(lambda m: m.group(1) + table + m.group(2), text)
        if count != 1:
            sys.exit(f"README.md: expected one {name} block, found {count}")
    return text


if __name__ == "__main__":
    README.write_text(rewrite(README.read_text()))
