"""The README's table of control routes names every route and method the sandbox serves."""

from __future__ import annotations

import re
from pathlib import Path

from numbersvc.sandbox import app

_README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_control_route_with_its_methods() -> None:
    text = _README.read_text()
    section = text[text.index("## The sandbox") : text.index("## Architecture")]
    documented: set[tuple[str, str]] = set()
    for methods, name in re.findall(r"^\| `([A-Z`, ]+) /__sandbox/(\w+)` \|", section, re.M):
        documented |= {(method, name) for method in re.findall(r"[A-Z]+", methods)}
    served = {(method, name) for name, handlers in app._CONTROL.items() for method in handlers}
    assert documented == served
