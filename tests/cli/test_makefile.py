"""The Makefile's `run` and `help` targets as a newcomer meets them (make -n: nothing runs)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.docs import DOCS, section

_ROOT = Path(__file__).resolve().parents[2]


def _make(*args: str, **env: str) -> str:
    done = subprocess.run(
        ["make", "--no-print-directory", "-C", str(_ROOT), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_run_leaves_the_listen_address_to_the_environment() -> None:
    # A second `make run` is started with NUMBERSVC_LISTEN: a --listen flag would win over it.
    command = _make("-n", "run", NUMBERSVC_LISTEN="127.0.0.1:50052")
    assert "numbersvc serve" in command
    assert "--listen" not in command


def test_run_still_takes_listen_from_make() -> None:
    command = _make("-n", "run", "LISTEN=127.0.0.1:50053")
    assert "numbersvc serve --listen 127.0.0.1:50053" in command


def test_help_shows_no_make_variables() -> None:
    text = _make("help")
    assert "run\t" in text
    assert "$(" not in text


def test_docs_describe_every_target_of_the_help() -> None:
    helped = {line.split("\t")[0] for line in _make("help").splitlines()}
    table = section(DOCS / "architecture.md", "Development")
    described = set(
        re.findall(r"`make ([a-z-]+)`", "\n".join(re.findall(r"^\| (.+?) \|", table, re.M)))
    )
    assert helped
    assert described == helped
