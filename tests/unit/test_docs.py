"""The README is a front door and the manual hangs together: its size, its links, its lists.

Every relative link in README.md and docs/ must reach a file (and a heading, when it names
one), every page of docs/ must be reachable from the README, the README's "Dependencies" must
say why each package the project pins is there, and every `NUMBERSVC_*` variable named must be
one the server or the CLI reads.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from numbersvc.cli.options import TARGET_ENV, TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, TOKEN_ENV
from numbersvc.config import settings
from tests.docs import DOCS, README, ROOT, headings, section

MAX_README_LINES = 250
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # an inline link; its text may span lines
_FENCED = re.compile(r"^(```|~~~).*?^\1$", re.M | re.S)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...
_REQUIREMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?")


def _documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _links(path: Path) -> list[str]:
    """The targets of the inline links of `path`, code blocks left out."""
    return _LINK.findall(_FENCED.sub("", path.read_text()))


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of `path` (a repeated one gets -1, -2, ...)."""
    seen: Counter[str] = Counter()
    anchors = set()
    for _, title, _ in headings(path.read_text()):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


def test_the_readme_is_read_in_five_minutes() -> None:
    assert len(README.read_text().splitlines()) <= MAX_README_LINES


@pytest.mark.parametrize("document", _documents(), ids=lambda path: path.name)
def test_every_relative_link_reaches_a_file_and_its_heading(document: Path) -> None:
    for target in _links(document):
        if _EXTERNAL.match(target):
            continue
        file, _, anchor = target.partition("#")
        linked = (document.parent / file).resolve() if file else document
        assert linked.is_relative_to(ROOT), f"{document.name}: {target} leaves the repository"
        assert linked.exists(), f"{document.name}: {target}: no such file"
        if anchor:
            assert linked.suffix == ".md", f"{document.name}: {target}: an anchor in a non-page"
            assert anchor in _anchors(linked), f"{document.name}: {target}: no such heading"


def test_every_page_of_the_manual_is_linked_from_the_readme() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert pages
    assert [page.name for page in pages if page.resolve() not in linked] == []


def test_the_readme_says_why_each_dependency_is_there() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    matches = [_REQUIREMENT_NAME.match(requirement) for requirement in requirements]
    names = {match.group(0).lower() for match in matches if match}
    assert len(names) == len(requirements)
    names |= set(json.loads((ROOT / "package.json").read_text())["devDependencies"])
    rows = re.findall(r"^\| ([^|]+) \| [^|]+\|$", section(README, "Dependencies"), re.M)
    listed = {
        name.lower()
        for row in rows
        for name in re.findall(r"[@\w][\w./\[\]@-]*", row.split("(")[0])
    }
    assert sorted(names - listed) == []


def test_every_variable_the_docs_name_is_one_numbersvc_reads() -> None:
    named = {
        name
        for document in [*_documents(), ROOT / "deploy" / "README.md"]
        for name in re.findall(r"\bNUMBERSVC_[A-Z0-9_]*[A-Z0-9]\b", document.read_text())
    }
    client = {TARGET_ENV, TOKEN_ENV, TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV}
    assert named
    assert sorted(named - {setting.env for _, setting, _ in settings()} - client) == []
