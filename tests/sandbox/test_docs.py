"""docs/sandbox.md's table of control routes names every route and method the sandbox serves."""

from __future__ import annotations

import re

from numbersvc.sandbox import app
from tests.docs import DOCS, section


def test_docs_list_every_control_route_with_its_methods() -> None:
    text = section(DOCS / "sandbox.md", "Control routes")
    documented: set[tuple[str, str]] = set()
    for methods, name in re.findall(r"^\| `([A-Z`, ]+) /__sandbox/(\w+)` \|", text, re.M):
        documented |= {(method, name) for method in re.findall(r"[A-Z]+", methods)}
    served = {(method, name) for name, handlers in app._CONTROL.items() for method in handlers}
    assert documented == served
