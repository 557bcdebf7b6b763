from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import types
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from numbersvc import logs
from numbersvc.cli import client, main
from numbersvc.config import Config, settings
from numbersvc.v1 import number_groups_pb2 as pb
from tests.cli import (
    ORDER_ID,
    RESULT_TIMEOUT_SECONDS,
    CliHarness,
    Terminal,
    run_main,
    sample_order,
)
from tests.docs import DOCS, section
from tests.ports import refused_port

CLIENT_COMMANDS = ["list", "stream", "get", "rent"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [
        "NUMBERSVC_TARGET",
        "PLIVO_AUTH_ID",
        "PLIVO_AUTH_TOKEN",
        "NUMBERSVC_UPSTREAM",
        "NO_COLOR",
    ]:
        monkeypatch.delenv(name, raising=False)


def exit_status(argv: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exited:
        main.main(argv)
    return exited.value.code


@pytest.mark.parametrize("command", ["serve", "sandbox", *CLIENT_COMMANDS])
def test_help_of_every_command_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: numbersvc {command}")
    assert "exit codes:" in text
    if command in CLIENT_COMMANDS:
        assert "env NUMBERSVC_TARGET" in text
        assert "--deadline SECONDS" in text
        assert "24 UNAVAILABLE" in text


def test_top_level_help_lists_the_commands_and_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert exit_status(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ["serve", "sandbox", *CLIENT_COMMANDS]:
        assert f"    {command} " in text
    assert "10+N a call failed with gRPC status code N" in text
    assert "13 INVALID_ARGUMENT" in text


def test_serve_help_documents_every_setting_with_its_env_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert exit_status(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for _, setting, _ in settings():
        assert f"{setting.flag} " in text
        assert f"env {setting.env};" in text


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["list"],  # --country is required
        ["list", "--country", "US", "--type", "mobile"],
        ["list", "--country", "US", "--services", "voice,fax"],
        ["list", "--country", "US", "--services", ","],
        ["list", "--country", "US", "--page-size", "0"],
        ["stream", "--country", "US", "--max-results", "-1"],
        ["get"],
        ["get", "1", "--deadline", "0"],
        ["get", "1", "--deadline", "nan"],
        ["rent", "1", "--quantity", "0"],
        ["rent", "1", "--quantity", "two"],
        ["sandbox", "--listen", "8089"],
        ["serve", "--retry-max-attempts", "many"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_unknown_service_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    exit_status(["list", "--country", "US", "--services", "voice,fax"])
    assert "unknown service 'fax': choose from voice, sms" in capsys.readouterr().err


def test_target_comes_from_the_environment_and_the_flag_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = main.build_parser
    assert parser().parse_args(["get", "1"]).target == "127.0.0.1:50051"
    monkeypatch.setenv("NUMBERSVC_TARGET", "numbers.internal:443")
    assert parser().parse_args(["get", "1"]).target == "numbers.internal:443"
    assert parser().parse_args(["get", "1", "--target", "h:1"]).target == "h:1"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "localhost",
            "no port in 'localhost' (gRPC would use 443): give HOST:PORT, such as localhost:50051",
        ),
        ("localhost:", "no port in 'localhost:'"),
        ("h:99999", "'h:99999' is not HOST:PORT"),
    ],
)
def test_a_target_without_a_port_is_a_usage_error(
    target: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_status(["get", "1", "--target", target]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("target", ["[::1]:50051", "dns:///localhost:50051", "unix:/run/s.sock"])
def test_targets_with_a_port_or_a_scheme_are_taken_as_given(target: str) -> None:
    assert main.build_parser().parse_args(["get", "1", "--target", target]).target == target


def test_deadline_defaults_are_10_s_and_30_s_for_rent() -> None:
    parser = main.build_parser()
    assert parser.parse_args(["get", "1"]).deadline == 10.0
    assert parser.parse_args(["rent", "1"]).deadline == 30.0
    assert parser.parse_args(["rent", "1", "--deadline", "2.5"]).deadline == 2.5


def test_list_flags_map_onto_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    harness, running, targets = run_main(
        [
            "list",
            "--country",
            "us",
            "--type",
            "tollfree",
            "--prefix",
            "800",
            "--region",
            "NY",
            "--services",
            "sms,voice,sms",
            "--page-size",
            "5",
            "--page-token",
            "tok",
            "--target",
            "h:1",
            "--deadline",
            "3",
        ]
    )
    _, request, rpc = harness.take_unary("ListNumberGroups", running)
    assert request == pb.ListNumberGroupsRequest(
        filter=pb.SearchFilter(
            region_code="us",  # the service upper-cases it
            number_type=pb.NUMBER_TYPE_TOLLFREE,
            prefix="800",
            region="NY",
            services=[pb.NUMBER_SERVICE_SMS, pb.NUMBER_SERVICE_VOICE],
        ),
        page_size=5,
        page_token="tok",
    )
    assert harness.recorder.timeouts == [3.0]
    assert targets == ["h:1"]
    rpc.terminate(pb.ListNumberGroupsResponse(), (), grpc.StatusCode.OK, "")
    assert running.result(timeout=RESULT_TIMEOUT_SECONDS) == 0
    assert capsys.readouterr().out == "0 of 0 groups; last page\n"


def test_stream_and_rent_flags_map_onto_their_requests() -> None:
    harness, running, _ = run_main(
        ["stream", "--country", "GB", "--max-results", "30", "--page-size", "7"]
    )
    _, request, rpc = harness.take_stream("StreamNumberGroups", running)
    assert request == pb.StreamNumberGroupsRequest(
        filter=pb.SearchFilter(region_code="GB"), page_size=7, max_results=30
    )
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert running.result(timeout=RESULT_TIMEOUT_SECONDS) == 0

    request_id = "3b241101-e2bb-4255-8caf-4136c566a962"
    harness, running, _ = run_main(
        ["rent", "737", "--quantity", "3", "--app-id", "42", "--request-id", request_id]
    )
    _, request, rpc = harness.take_unary("RentNumbers", running)
    assert request == pb.RentNumbersRequest(
        group_id="737", quantity=3, app_id="42", request_id=request_id
    )
    assert harness.recorder.timeouts == [30.0]
    rpc.terminate(pb.RentNumbersResponse(), (), grpc.StatusCode.OK, "")
    assert running.result(timeout=RESULT_TIMEOUT_SECONDS) == 0


@pytest.mark.parametrize(
    ("argv", "terminal", "progress"),
    [
        (["stream", "--country", "US"], True, True),
        (["stream", "--country", "US", "--json"], True, False),
        (["stream", "--country", "US"], False, False),
    ],
)
def test_progress_only_on_a_terminal_and_never_with_json(
    argv: list[str], terminal: bool, progress: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[client.Console] = []

    def fake_stream(channel: object, request: object, options: object, console: Any) -> int:
        seen.append(console)
        return 0

    monkeypatch.setattr(client, "stream_groups", fake_stream)
    monkeypatch.setattr(sys, "stderr", Terminal() if terminal else io.StringIO())
    assert main.run(argv, open_channel=lambda args: CliHarness().recorder.as_channel()) == 0
    assert [c.progress for c in seen] == [progress]


@pytest.mark.parametrize(
    ("terminal", "no_color", "json", "colour"),
    [
        (True, "", False, True),
        (False, "", False, False),
        (True, "1", False, False),
        (True, "", True, False),
    ],
)
def test_colour_only_on_a_terminal_without_no_color_and_never_with_json(
    terminal: bool, no_color: str, json: bool, colour: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, err = (Terminal(), Terminal()) if terminal else (io.StringIO(), io.StringIO())
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("NO_COLOR", no_color)
    harness, running, _ = run_main(["orders", "get", ORDER_ID, *(["--json"] if json else [])])
    _, _, rpc = harness.take_unary("GetRentalOrder", running)
    rpc.terminate(pb.GetRentalOrderResponse(order=sample_order()), (), grpc.StatusCode.OK, "")
    assert running.result(timeout=RESULT_TIMEOUT_SECONDS) == 0
    assert ("\x1b[32mfulfilled\x1b[0m" in out.getvalue()) is colour
    assert ("\x1b" in out.getvalue()) is colour


def test_error_prefix_is_red_on_a_terminal_stderr_only(monkeypatch: pytest.MonkeyPatch) -> None:
    err = Terminal()
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # piped: its colour is off, not stderr's
    monkeypatch.setattr(sys, "stderr", err)
    harness, running, _ = run_main(["get", "1"])
    _, _, rpc = harness.take_unary("GetNumberGroup", running)
    rpc.terminate(None, (), grpc.StatusCode.NOT_FOUND, "no group 1")
    assert running.result(timeout=RESULT_TIMEOUT_SECONDS) == 15
    assert err.getvalue() == "\x1b[31merror:\x1b[0m NOT_FOUND: no group 1\n"


@pytest.mark.parametrize("command", [*CLIENT_COMMANDS, "orders list", "orders get"])
def test_client_help_says_when_output_is_coloured(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_status([*command.split(), "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the wrapping
    assert "Colour only on a terminal, never with --json, and none when NO_COLOR is set" in text
    assert ("progress bar" in text) is (command == "stream")


def test_unreachable_server_names_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    with refused_port() as port:
        target = f"127.0.0.1:{port}"
        code = main.main(["get", "1", "--target", target, "--deadline", "5"])
    assert code == 10 + grpc.StatusCode.UNAVAILABLE.value[0]
    err = capsys.readouterr().err
    assert err.startswith(f"error: UNAVAILABLE: cannot reach numbersvc at {target}: ")
    assert len(err.splitlines()) == 1


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Replace `numbersvc.server` (imported by `serve` when it runs) with one that records."""
    served: list[Config] = []

    async def serve(config: Config) -> int:
        served.append(config)
        return 3

    module = types.ModuleType("numbersvc.server")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "numbersvc.server", module)
    monkeypatch.setattr(logs, "configure_logging", lambda level, *_: None)
    return served


@pytest.mark.parametrize(
    ("env", "argv", "missing"),
    [
        ({"PLIVO_AUTH_ID": "MAXXXXXXXXXXXXXXXXXX"}, [], "PLIVO_AUTH_TOKEN"),
        ({}, ["--plivo-auth-token", "secret"], "PLIVO_AUTH_ID"),
        ({"NUMBERSVC_UPSTREAM": "plivo"}, [], "PLIVO_AUTH_ID"),
    ],
)
def test_serve_refuses_contradictory_settings_before_starting(
    env: dict[str, str],
    argv: list[str],
    missing: str,
    fake_server: list[Config],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main.main(["serve", "--listen", "127.0.0.1:0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: configuration: ")
    assert missing in err
    assert fake_server == []


def test_serve_rejects_a_bad_environment_value(
    fake_server: list[Config], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NUMBERSVC_RETRY_MAX_ATTEMPTS", "0")
    assert main.main(["serve"]) == 2
    assert "NUMBERSVC_RETRY_MAX_ATTEMPTS must be at least 1" in capsys.readouterr().err
    assert fake_server == []


def test_serve_layers_flags_over_the_environment_and_returns_the_servers_code(
    fake_server: list[Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    levels: list[str] = []
    monkeypatch.setattr(logs, "configure_logging", lambda level, *_: levels.append(level))
    monkeypatch.setenv("NUMBERSVC_LISTEN", "0.0.0.0:7000")
    monkeypatch.setenv("NUMBERSVC_SANDBOX_SEED", "11")
    assert main.main(["serve", "--listen", "127.0.0.1:0", "--log-level", "DEBUG"]) == 3
    [config] = fake_server
    assert (config.listen, config.sandbox_seed, config.log_level) == ("127.0.0.1:0", 11, "DEBUG")
    assert levels == ["DEBUG"]


@pytest.fixture
def fake_sandbox(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Replace `numbersvc.sandbox` with one that records its arguments, then is Ctrl-C'd."""
    runs: list[tuple[str, int, int]] = []

    async def run_sandbox(host: str, port: int, *, seed: int) -> None:
        runs.append((host, port, seed))
        raise KeyboardInterrupt

    module = types.ModuleType("numbersvc.sandbox")
    module.run_sandbox = run_sandbox  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "numbersvc.sandbox", module)
    monkeypatch.setattr(logs, "configure_logging", lambda level, *_: None)
    return runs


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ("127.0.0.1", 8089, Config().sandbox_seed)),
        (["--listen", "0.0.0.0:0", "--seed", "3"], ("0.0.0.0", 0, 3)),
        (["--listen", "[::1]:9000"], ("::1", 9000, Config().sandbox_seed)),
    ],
)
def test_sandbox_runs_until_ctrl_c_and_exits_0(
    argv: list[str], expected: tuple[str, int, int], fake_sandbox: list[tuple[str, int, int]]
) -> None:
    assert main.main(["sandbox", *argv]) == 0
    assert fake_sandbox == [expected]


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["list", "--country", "US"], client.list_groups),
        (["stream", "--country", "US"], client.stream_groups),
        (["get", "1"], client.get_group),
        (["rent", "1"], client.rent_numbers),
    ],
)
def test_client_commands_dispatch_to_their_client_function(
    argv: list[str], command: Callable[..., int]
) -> None:
    args = main.build_parser().parse_args(argv)
    assert args.client_command.resolve() is command


def test_python_dash_m_numbersvc_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "numbersvc", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout.startswith("numbersvc ")


# What `--version` and `--help` must not load: each costs a tenth of a second or more.
HEAVY_MODULES = ("grpc", "httpx", "aiohttp", "google.protobuf", "asyncio")
# What a client command must not load: the server's HTTP stack and the ledger.
SERVER_MODULES = ("httpx", "aiohttp", "sqlite3", "numbersvc.ledger", "numbersvc.upstream.client")


def _modules_after(argv: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """Run the CLI in a fresh interpreter (this one imported everything); modules it loaded."""
    script = (
        "import json, sys\n"
        "from numbersvc.cli import main\n"
        "try:\n"
        f"    main.main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"loaded = sorted(m for m in sys.modules if m.startswith({prefixes!r}))\n"
        "print(json.dumps(loaded), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stderr.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize(
    "argv", [["--version"], ["--help"], ["list", "--help"], ["serve", "--help"]]
)
def test_version_and_help_import_nothing_heavy(argv: list[str]) -> None:
    # Only --version reads the installed metadata (tens of milliseconds).
    heavy = HEAVY_MODULES if argv == ["--version"] else (*HEAVY_MODULES, "importlib.metadata")
    assert _modules_after(argv, heavy) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["get", "1"],
        ["list", "--country", "US"],
        ["orders", "list"],
        ["orders", "get", "6f9619ff-8b86-d011-b42d-00c04fc964ff"],
        [
            "orders",
            "settle",
            "6f9619ff-8b86-d011-b42d-00c04fc964ff",
            "--as",
            "failed",
            "--note",
            "n",
        ],
    ],
)
def test_client_commands_import_no_server_module(argv: list[str]) -> None:
    # Nothing listens on port 1: the call fails fast, after everything it needs was loaded.
    argv = [*argv, "--target", "127.0.0.1:1", "--deadline", "0.5"]
    assert _modules_after(argv, SERVER_MODULES) == []


def test_docs_name_every_exit_code_of_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_status(["--help"]) == 0
    help_codes = set(re.findall(r"^  (\d+) ", capsys.readouterr().out, re.M))
    text = section(DOCS / "configuration.md", "The command line")
    sentence = " ".join(text[text.index("Exit codes:") :].split())
    sentence = sentence[: sentence.index("A failed call")]
    assert help_codes == {"0", "1", "2", "130"}
    for code in help_codes:
        assert re.search(rf"[:,] {code} ", sentence), code
    assert "10 + the gRPC status code" in sentence
