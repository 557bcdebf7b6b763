"""tests/ci.py: a missing component fails the test under CI and skips it elsewhere."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Final

import pytest

from tests.ci import require, under_ci

_ROOT: Final = Path(__file__).resolve().parents[2]
CI_ON: Final = ["true", "TRUE", "True", "1", " true\n"]
CI_OFF: Final = [None, "", "false", "0", "no", "yes", "truthy"]


def _set_ci(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)


@pytest.mark.parametrize("value", CI_ON)
def test_under_ci_a_missing_component_fails(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    _set_ci(monkeypatch, value)
    with pytest.raises(pytest.fail.Exception, match="no widget here"):
        require(None, "no widget here")
    with pytest.raises(pytest.fail.Exception, match="needs root"):
        require(False, "needs root")


@pytest.mark.parametrize("value", CI_OFF)
def test_elsewhere_a_missing_component_skips(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    _set_ci(monkeypatch, value)
    with pytest.raises(pytest.skip.Exception, match="no widget here"):
        require(None, "no widget here")
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        require(False, "needs root")


@pytest.mark.parametrize("value", [*CI_ON, *CI_OFF])
def test_what_is_found_is_returned(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    _set_ci(monkeypatch, value)
    assert require("/usr/bin/widget", "unused") == "/usr/bin/widget"
    assert require(True, "unused") is True
    # A falsy value that is not None or False is something found (an exit code, an empty list).
    assert require(0, "unused") == 0


@pytest.mark.parametrize("value", [*CI_ON, *CI_OFF])
def test_the_makefile_reads_ci_as_the_tests_do(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    # The Makefile's UNDER_CI decides whether a missing Go or Java toolchain fails `make pytest`.
    _set_ci(monkeypatch, value)
    probe = "under-ci-probe: ; @if $(UNDER_CI); then echo yes; else echo no; fi"
    done = subprocess.run(
        ["make", "--no-print-directory", "-s", "-C", str(_ROOT), "--eval", probe, "under-ci-probe"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == ("yes" if under_ci() else "no")
    assert under_ci() is (value in CI_ON)
