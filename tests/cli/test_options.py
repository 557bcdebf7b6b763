from __future__ import annotations

import argparse

import grpc
import pytest

from numbersvc.cli import options, render


def test_exit_code_table_aligns_and_wraps_long_rows() -> None:
    text = options.exit_code_table([(0, "fine"), (1, "a reason " * 12), (130, "stopped")])
    lines = text.splitlines()
    assert lines[0] == "exit codes:"
    assert lines[1] == "  0    fine"
    assert lines[2].startswith("  1    a reason")
    assert lines[3].startswith("       a reason")  # wrapped under the text, not the code
    assert lines[-1] == "  130  stopped"
    assert max(map(len, lines)) <= 79


def test_exit_codes_epilog_puts_extra_rows_in_order() -> None:
    lines = options.exit_codes_epilog((1, "one")).splitlines()
    assert lines[1:4] == [
        "  0    success",
        "  1    one",
        "  2    usage error, or a bad configuration",
    ]
    assert lines[4] == "  10+N a call failed with gRPC status code N:"
    assert "24 UNAVAILABLE" in " ".join(lines)


CHOICES = ("outcome_unknown", "failed")


@pytest.mark.parametrize(
    ("raw", "values"),
    [
        ("failed", ["failed"]),
        (" Outcome-Unknown , FAILED ", ["outcome_unknown", "failed"]),
        ("failed,outcome_unknown,failed", ["failed", "outcome_unknown"]),
        ("failed,,", ["failed"]),
    ],
)
def test_comma_choices_read_names_in_any_case_once_each(raw: str, values: list[str]) -> None:
    assert options.comma_choices(CHOICES, "status")(raw) == values


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("lost", "unknown status 'lost': choose from outcome_unknown, failed"),
        ("failed,lost,gone", "unknown status 'lost', 'gone'"),
        (" , ", "unknown status none"),
    ],
)
def test_comma_choices_name_what_is_unknown(raw: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        options.comma_choices(CHOICES, "status")(raw)


@pytest.mark.parametrize(
    ("parse", "raw"),
    [
        (options.positive_int, "0"),
        (options.positive_int, "1.5"),
        (options.positive_float, "0"),
        (options.positive_float, "inf"),
        (options.positive_float, "nan"),
    ],
)
def test_positive_numbers_refuse_the_rest(parse: object, raw: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse(raw)  # type: ignore[operator]


def test_rpc_code_names_are_grpcs_status_codes() -> None:
    assert (
        tuple(code.name for code in sorted(grpc.StatusCode, key=lambda code: code.value[0]))
        == options.RPC_CODE_NAMES
    )
    assert [code.value[0] for code in grpc.StatusCode] == list(range(len(grpc.StatusCode)))


def test_choice_names_are_the_protos_enum_names() -> None:
    assert tuple(render.NUMBER_TYPES) == options.NUMBER_TYPE_NAMES
    assert tuple(render.SERVICES) == options.SERVICE_NAMES
    assert tuple(render.ORDER_STATUSES) == options.ORDER_STATUS_NAMES
