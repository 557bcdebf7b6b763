"""`numbersvc callers add|list|remove` against real callers files."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from numbersvc.callers import CALLERS_FILE_ENV, Caller, Callers, add_caller
from numbersvc.cli import callers, main

READ: Final = "numbers.read"
RENT: Final = "numbers.rent"
SPIFFE_ID: Final = "spiffe://example.org/ns/billing/sa/api"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CALLERS_FILE_ENV, raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


@pytest.fixture
def file(tmp_path: Path) -> Path:
    return tmp_path / "etc" / "callers.json"


def exit_status(argv: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exited:
        main.main(argv)
    return exited.value.code


def run(*argv: str, file: Path | None = None) -> int:
    return main.main(["callers", *argv, *(["--file", str(file)] if file else [])])


# --- help and usage ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["callers", "callers add", "callers list", "callers remove"])
def test_help_of_every_callers_command_exits_0(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_status([*command.split(), "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: numbersvc {command}")
    assert "exit codes:" in text
    assert "  1    the callers file is missing, malformed or cannot be written" in text
    assert "10+N" not in text  # no server is called
    if command != "callers":
        assert f"env {CALLERS_FILE_ENV}" in text


def test_add_help_says_the_token_is_shown_once_and_names_the_permissions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert exit_status(["callers", "add", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "--permissions numbers.read,numbers.rent,numbers.settle" in text
    assert "[--spiffe-id URI | --common-name CN]" in text
    assert "printed alone on stdout, once" in text
    assert "keeps only its SHA-256" in text


def test_top_level_help_lists_callers_and_what_1_means(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status(["--help"]) == 0
    text = capsys.readouterr().out
    assert "    callers " in text
    assert f"  1    {callers.BAD_CALLERS_FILE}\n" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["callers"],
        ["callers", "add", "billing"],  # --permissions is required
        ["callers", "add", "--permissions", READ],  # NAME is required
        ["callers", "add", "billing", "--permissions", "numbers.write"],
        ["callers", "add", "billing", "--permissions", ","],
        [
            "callers",
            "add",
            "b",
            "--permissions",
            READ,
            "--spiffe-id",
            SPIFFE_ID,
            "--common-name",
            "x",
        ],
        ["callers", "remove"],
        ["callers", "list", "extra"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status([*argv, "--file", "unused.json"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "bad name", "--permissions", READ], "a caller name is 1 to 64"),
        (["add", "a", "--permissions", READ, "--spiffe-id", "spiffe://x"], "not a SPIFFE ID"),
        (["add", "a", "--permissions", READ, "--common-name", " x"], "not a common name"),
    ],
)
def test_bad_values_exit_2_and_create_nothing(
    argv: list[str], message: str, file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_status(["callers", *argv, "--file", str(file)]) == 2
    assert message in capsys.readouterr().err
    assert not file.parent.exists()


@pytest.mark.parametrize(
    "command", [["add", "a", "--permissions", READ], ["list"], ["remove", "a"]]
)
def test_without_file_or_environment_exits_2(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(CALLERS_FILE_ENV, "")  # empty counts as unset
    assert exit_status(["callers", *command]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"pass --file PATH or set {CALLERS_FILE_ENV}" in captured.err


# --- add --------------------------------------------------------------------------------------


def test_add_prints_only_the_token_on_stdout(
    file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("add", "billing", "--permissions", "numbers.rent,Numbers.Read", file=file) == 0
    captured = capsys.readouterr()
    token = captured.out.removesuffix("\n")
    assert captured.out == f"{token}\n"
    assert len(token) == 43
    assert "\n" not in token
    assert Callers.load(file).by_token(token) == Caller("billing", frozenset({READ, RENT}))
    assert token not in captured.err
    assert "shown this once" in captured.err
    assert token not in file.read_text()
    assert stat.S_IMODE(file.stat().st_mode) == 0o600


def test_add_grants_the_settle_permission_alone(
    file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("add", "oncall", "--permissions", "numbers.settle", file=file) == 0
    token = capsys.readouterr().out.strip()
    assert Callers.load(file).by_token(token) == Caller("oncall", frozenset({"numbers.settle"}))


def test_add_again_replaces_the_token(file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("add", "billing", "--permissions", READ, file=file) == 0
    old = capsys.readouterr().out.strip()
    assert run("add", "billing", "--permissions", READ, file=file) == 0
    new = capsys.readouterr().out.strip()
    loaded = Callers.load(file)
    assert len(loaded) == 1
    assert loaded.by_token(old) is None
    assert loaded.by_token(new) is not None


def test_add_finds_the_file_through_the_environment(
    file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(CALLERS_FILE_ENV, str(file))
    assert run("add", "billing", "--permissions", READ) == 0
    token = capsys.readouterr().out.strip()
    assert Callers.load(file).by_token(token) is not None


def test_file_overrides_the_environment(
    file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CALLERS_FILE_ENV, str(tmp_path / "other.json"))
    assert run("add", "billing", "--permissions", READ, file=file) == 0
    assert file.exists()
    assert not (tmp_path / "other.json").exists()


@pytest.mark.parametrize(
    ("flag", "value", "lookup"),
    [
        ("--spiffe-id", SPIFFE_ID, Callers.by_spiffe_id),
        ("--common-name", "billing.internal", Callers.by_common_name),
    ],
)
def test_add_with_a_certificate_identity_prints_nothing_on_stdout(
    file: Path,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    value: str,
    lookup: Callable[[Callers, str], Caller | None],
) -> None:
    assert run("add", "mesh", "--permissions", READ, flag, value, file=file) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "caller mesh (numbers.read) saved in" in captured.err
    assert lookup(Callers.load(file), value) == Caller("mesh", frozenset({READ}))


def test_add_to_a_malformed_file_exits_1_and_keeps_it(
    file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file.parent.mkdir()
    file.write_text('{"version": 2, "callers": []}')
    assert run("add", "billing", "--permissions", READ, file=file) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"error: callers file {file}: version 2 is not supported" in captured.err
    assert file.read_text() == '{"version": 2, "callers": []}'


def test_add_of_another_callers_identity_exits_1(
    file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_caller(file, "mesh", [READ], spiffe_id=SPIFFE_ID)
    assert run("add", "copy", "--permissions", READ, "--spiffe-id", SPIFFE_ID, file=file) == 1
    assert "caller 'mesh' already has that SPIFFE ID" in capsys.readouterr().err


# --- list -------------------------------------------------------------------------------------


def test_list_prints_names_permissions_and_identities_never_hashes(
    file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = add_caller(file, "billing", [READ])
    add_caller(file, "mesh-svc", [RENT, READ], spiffe_id=SPIFFE_ID)
    add_caller(file, "legacy", [RENT], common_name="legacy.internal")
    assert token is not None
    assert run("list", file=file) == 0
    captured = capsys.readouterr()
    assert captured.out == (
        "NAME      PERMISSIONS                IDENTITY\n"
        "billing   numbers.read               token\n"
        f"mesh-svc  numbers.read,numbers.rent  spiffe_id {SPIFFE_ID}\n"
        "legacy    numbers.rent               common_name legacy.internal\n"
        f"3 callers in {file}\n"
    )
    digest = json.loads(file.read_text())["callers"][0]["token_sha256"]
    assert digest not in captured.out + captured.err
    assert token not in captured.out + captured.err


def test_list_of_an_empty_file(file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file.parent.mkdir()
    file.write_text('{"version": 1, "callers": []}')
    assert run("list", file=file) == 0
    assert capsys.readouterr().out == f"0 callers in {file}\n"


@pytest.mark.parametrize("content", ["{", '{"version": 1, "callers": [{"name": "a"}]}', None])
def test_list_of_a_missing_or_malformed_file_exits_1(
    file: Path, content: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    if content is not None:
        file.parent.mkdir()
        file.write_text(content)
    assert run("list", file=file) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: callers file {file}")


# --- remove -----------------------------------------------------------------------------------


def test_remove_deletes_the_caller(file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gone = add_caller(file, "billing", [READ])
    add_caller(file, "mesh", [READ], spiffe_id=SPIFFE_ID)
    assert gone is not None
    assert run("remove", "billing", file=file) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"caller billing removed from {file}" in captured.err
    loaded = Callers.load(file)
    assert [e.caller.name for e in loaded.entries()] == ["mesh"]
    assert loaded.by_token(gone) is None


def test_remove_of_an_unknown_caller_exits_1(
    file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_caller(file, "billing", [READ])
    assert run("remove", "nobody", file=file) == 1
    assert f"error: no caller named 'nobody' in {file}" in capsys.readouterr().err
    assert len(Callers.load(file)) == 1


def test_remove_from_a_malformed_file_exits_1(
    file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file.parent.mkdir()
    file.write_text("[]")
    assert run("remove", "billing", file=file) == 1
    assert "the top level is not a JSON object" in capsys.readouterr().err
    assert file.read_text() == "[]"


def test_remove_from_a_missing_file_exits_1(file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("remove", "billing", file=file) == 1
    assert f"error: callers file {file} does not exist" in capsys.readouterr().err
    assert not file.parent.exists()
