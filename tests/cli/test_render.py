from __future__ import annotations

import json

import pytest
from google.protobuf import json_format, timestamp_pb2
from google.type import money_pb2

from numbersvc.cli import render
from numbersvc.v1 import number_groups_pb2 as pb
from tests.cli import ORDER_ID, sample_group, sample_order, strip_ansi, usd

INT64_MAX = 2**63 - 1
COLOUR = render.Style(colour=True)
BOLD, GREEN, YELLOW, RED, RESET = "\x1b[1m", "\x1b[32m", "\x1b[33m", "\x1b[31m", "\x1b[0m"


@pytest.mark.parametrize(
    ("money", "text"),
    [
        (usd(0, 7_000_000), "$0.007"),
        (usd(0, 800_000_000), "$0.80"),
        (usd(0, 8_500_000), "$0.0085"),
        (usd(0, 1), "$0.000000001"),
        (usd(12), "$12.00"),
        (usd(0), "$0.00"),
        (usd(-1, -500_000_000), "-$1.50"),
        (usd(0, -5_000_000), "-$0.005"),
        # Exact where a float is not: 2**63 - 1 has 19 digits, a double keeps about 16.
        (usd(INT64_MAX, 999_999_999), "$9223372036854775807.999999999"),
        (money_pb2.Money(currency_code="EUR", units=12, nanos=500_000_000), "12.50 EUR"),
        (money_pb2.Money(units=3), "3.00"),
        (None, "-"),
    ],
)
def test_format_money_is_exact(money: money_pb2.Money | None, text: str) -> None:
    assert render.format_money(money) == text


def test_format_money_adds_malformed_mixed_signs_instead_of_concatenating() -> None:
    # units=1, nanos=-250000000 is 0.75, not "1.-25".
    assert render.format_money(usd(1, -250_000_000)) == "$0.75"


def test_command_line_names_come_from_the_enums() -> None:
    assert render.NUMBER_TYPES == {
        "local": pb.NUMBER_TYPE_LOCAL,
        "national": pb.NUMBER_TYPE_NATIONAL,
        "tollfree": pb.NUMBER_TYPE_TOLLFREE,
    }
    assert render.SERVICES == {"voice": pb.NUMBER_SERVICE_VOICE, "sms": pb.NUMBER_SERVICE_SMS}


def test_order_status_names_come_from_the_enum_and_include_unspecified() -> None:
    assert render.ORDER_STATUSES == {
        "fulfilled": pb.ORDER_STATUS_FULFILLED,
        "pending": pb.ORDER_STATUS_PENDING,
        "outcome_unknown": pb.ORDER_STATUS_OUTCOME_UNKNOWN,
        "failed": pb.ORDER_STATUS_FAILED,
        "unspecified": pb.ORDER_STATUS_UNSPECIFIED,
    }


def test_group_row_tells_an_unset_sms_rate_from_a_free_one() -> None:
    unset = pb.NumberGroup()
    unset.CopyFrom(sample_group(sms_enabled=False, services=[pb.NUMBER_SERVICE_VOICE]))
    unset.ClearField("sms_rate")
    assert render.group_row(unset)[-1] == "-"
    assert render.group_row(sample_group(sms_rate=usd(0)))[-1] == "$0.00"


def test_group_row_shows_unknown_enum_values_from_a_newer_server() -> None:
    group = sample_group(number_type=9, upstream_number_type="mobile", services=[1, 7])
    row = render.group_row(group)
    assert row[1:5] == ("mobile", "212", "New York, UNITED STATES", "voice,unknown(7)")


def test_groups_table_aligns_text_left_and_numbers_right() -> None:
    groups = [
        sample_group(),
        sample_group(
            group_id="5",
            number_type=pb.NUMBER_TYPE_TOLLFREE,
            upstream_number_type="tollfree",
            prefix="800",
            region="",
            stock=7,
            services=[pb.NUMBER_SERVICE_VOICE],
            rental_rate=usd(2),
            voice_rate=usd(0, 12_000_000),
            sms_rate=None,
        ),
    ]
    assert render.groups_table(groups).splitlines() == [
        "GROUP ID        TYPE      PREFIX  REGION                   SERVICES   STOCK"
        "  MONTHLY  SETUP  VOICE/MIN     SMS",
        "73762538809838  local     212     New York, UNITED STATES  voice,sms    220"
        "    $0.80  $0.00    $0.0085  $0.005",
        "5               tollfree  800     -                        voice          7"
        "    $2.00  $0.00     $0.012       -",
    ]


def test_table_line_lets_a_long_cell_push_instead_of_cutting_it() -> None:
    table = render.Table(("A", "N"), right_aligned=frozenset({1}))
    assert table.line(("abcdef", "1"), [3, 2]) == "abcdef   1"


@pytest.mark.parametrize(
    ("token", "footer"),
    [
        ("tok", "2 of 40 groups; next page: --page-token tok"),
        ("", "2 of 40 groups; last page"),
    ],
)
def test_list_footer(token: str, footer: str) -> None:
    assert render.list_footer(2, 40, token) == footer


def test_counts_of_one_are_singular() -> None:
    assert render.list_footer(1, 1, "") == "1 of 1 group; last page"
    assert render.progress_bar(1, 1, width=4) == "[####] 1/1 group  100%"
    assert render.resume_hint(1, "t") == "1 group received; resume with --page-token t"


def test_stream_footer_offers_the_token_only_when_the_stream_stopped_early() -> None:
    assert render.stream_footer(10, 28, "tok") == "10 groups streamed of 28; more: --page-token tok"
    assert render.stream_footer(28, 28, "") == "28 groups streamed of 28"


def test_json_line_is_one_line_of_proto_json_with_proto_field_names() -> None:
    group = sample_group()
    line = render.json_line(group)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed == json_format.MessageToDict(group, preserving_proto_field_name=True)
    assert parsed["group_id"] == "73762538809838"
    assert parsed["stock"] == "220"  # int64 is a string in proto3 JSON: exact in any reader
    assert parsed["sms_rate"] == {"currency_code": "USD", "nanos": 5_000_000}


def test_json_text_is_indented_and_round_trips() -> None:
    response = pb.ListNumberGroupsResponse(
        number_groups=[sample_group()], next_page_token="t", total_size=3
    )
    text = render.json_text(response)
    assert text.startswith('{\n  "number_groups": [')
    again = json_format.ParseDict(json.loads(text), pb.ListNumberGroupsResponse())
    assert again == response


def test_group_details() -> None:
    assert render.group_details(sample_group(region_code="")) == (
        "group id:  73762538809838\n"
        "type:      local\n"
        "prefix:    212\n"
        "region:    New York, UNITED STATES\n"
        "country:   -\n"
        "stock:     220\n"
        "services:  voice,sms\n"
        "monthly:   $0.80\n"
        "setup:     $0.00\n"
        "voice/min: $0.0085\n"
        "sms:       $0.005"
    )


def test_order_details_lists_numbers_in_e164_and_says_which_failed() -> None:
    order = pb.RentalOrder(
        status=pb.ORDER_STATUS_FULFILLED,
        upstream_status="fulfilled",
        numbers=[
            pb.RentedNumber(
                number="12125550100",
                e164="+12125550100",
                status=pb.RENTED_NUMBER_STATUS_SUCCESS,
                upstream_status="Success",
            ),
            pb.RentedNumber(
                number="12125550101",
                e164="+12125550101",
                status=pb.RENTED_NUMBER_STATUS_FAILED,
                upstream_status="Failed",
            ),
        ],
        group_id="737",
        quantity=2,
        request_id="rid",
        upstream_request_id="api-1",
        create_time=timestamp_pb2.Timestamp(seconds=1_700_000_000),
    )
    assert render.order_details(order) == (
        "status:      fulfilled\n"
        "group id:    737\n"
        "quantity:    2\n"
        "numbers:     +12125550100  rented\n"
        "             +12125550101  failed (upstream: Failed)\n"
        "app id:      (account default)\n"
        "request id:  rid\n"
        "upstream id: api-1\n"
        "created:     2023-11-14T22:13:20Z"
    )


def test_order_details_of_a_pending_order_carries_its_details() -> None:
    order = pb.RentalOrder(
        status=pb.ORDER_STATUS_PENDING,
        upstream_status="pending",
        details="Regulatory documents are needed",
        group_id="737",
        quantity=1,
        app_id="42",
        request_id="rid",
    )
    lines = render.order_details(order).splitlines()
    assert lines[:5] == [
        "status:      pending",
        "group id:    737",
        "quantity:    1",
        "numbers:     -",
        "details:     Regulatory documents are needed",
    ]
    assert "app id:      42" in lines
    assert "upstream id: -" in lines
    assert not any(line.startswith("created:") for line in lines)


def test_order_details_of_an_unknown_status_shows_the_upstream_text() -> None:
    order = pb.RentalOrder(status=pb.ORDER_STATUS_UNSPECIFIED, upstream_status="backordered")
    assert render.order_details(order).splitlines()[0] == "status:      backordered"
    order = pb.RentalOrder(status=pb.ORDER_STATUS_OUTCOME_UNKNOWN)
    assert render.order_details(order).splitlines()[0] == "status:      outcome unknown"


def test_error_lines_show_every_decoded_detail_in_order() -> None:
    report = render.ErrorReport(
        "INVALID_ARGUMENT",
        "2 fields are invalid",
        reason="INVALID_REQUEST",
        metadata={"operation": "search", "httpStatus": "400"},
        violations=[("filter.prefix", "must be 1 to 5 digits"), ("page_size", "negative")],
        retry_delay_seconds=1.5,
        resource="numbersvc.v1.NumberGroup 99",
        hints=["try again"],
    )
    assert render.error_lines(report) == [
        "error: INVALID_ARGUMENT: 2 fields are invalid",
        "  reason: INVALID_REQUEST",
        "  filter.prefix: must be 1 to 5 digits",
        "  page_size: negative",
        "  resource: numbersvc.v1.NumberGroup 99",
        "  retry after: 1.5 s",
        "  metadata: httpStatus=400, operation=search",
        "hint: try again",
    ]


def test_error_lines_of_a_bare_status_is_one_line() -> None:
    assert render.error_lines(render.ErrorReport("UNAVAILABLE", "down")) == [
        "error: UNAVAILABLE: down"
    ]


def test_order_row_shows_utc_seconds_e164_numbers_and_dashes_for_blanks() -> None:
    assert render.order_row(sample_order()) == (
        ORDER_ID,
        "2026-05-01T12:00:03Z",
        "fulfilled",
        "737",
        "2",
        "+14155550100,+14155550101",
        "alice",
        "-",
    )
    bare = pb.RentalOrder(request_id="r", status=pb.ORDER_STATUS_UNSPECIFIED, upstream_status="x")
    assert render.order_row(bare) == ("r", "-", "x", "-", "0", "-", "-", "-")


@pytest.mark.parametrize(
    ("message", "note"),
    [
        ("settled as failed: not in console", "settled as failed: not in console"),
        ("line one\n  line two", "line one line two"),
        (
            "settled as fulfilled: seen in the Plivo console by oncall",
            "settled as fulfilled: seen in the...",
        ),
        ("x" * 60, "x" * 37 + "..."),  # one long word: cut inside it
    ],
)
def test_order_row_keeps_the_note_to_one_short_line(message: str, note: str) -> None:
    cell = render.order_row(sample_order(status_message=message))[-1]
    assert cell == note
    assert len(cell) <= 40


def test_orders_table_aligns_the_quantity_right() -> None:
    lines = render.orders_table([sample_order(quantity=12), sample_order()]).splitlines()
    end = lines[0].index("QTY") + len("QTY")
    assert [line[end - 3 : end + 2] for line in lines] == ["QTY  ", " 12  ", "  2  "]


def test_streamed_table_keeps_one_header_and_the_first_batchs_widths() -> None:
    table = render.StreamedTable(render.Table(headers=("A", "B"), right_aligned=frozenset({1})))
    assert table.add([("xx", "1")]) == "A   B\nxx  1"
    assert table.add([("x", "10")]) == "x   10"  # a wider cell pushes its own row only
    assert table.add([("xxxx", "2")]) == "xxxx  2"
    assert table.add([("x", "3")]) == "x   3"  # still under the header's B
    assert table.widths == [2, 1]


def test_streamed_groups_line_up_with_the_header_on_every_page() -> None:
    table = render.StreamedTable(render.GROUPS_TABLE)
    short = pb.NumberGroup(group_id="1", region="NY", stock=5)
    wide = pb.NumberGroup(group_id="12345678901234", region="New York, UNITED STATES", stock=5)
    lines = table.add([render.group_row(short)]).splitlines()
    lines += table.add([render.group_row(wide)]).splitlines()
    lines += table.add([render.group_row(short)]).splitlines()
    stock_end = lines[0].index("STOCK") + len("STOCK")
    assert lines[1][stock_end - 1] == "5"
    assert lines[3][stock_end - 1] == "5"  # the page after a wide one: under the header again


def test_list_footer_and_resume_hint_name_what_they_count() -> None:
    assert render.list_footer(3, 3, "", noun="order") == "3 of 3 orders; last page"
    assert (
        render.resume_hint(1, "t", noun="order") == "1 order received; resume with --page-token t"
    )


def test_order_details_shows_the_note_caller_and_update_time_when_set() -> None:
    order = sample_order(
        status=pb.ORDER_STATUS_FAILED,
        upstream_status="",
        numbers=[],
        status_message="settled as failed: not in console",
        update_time=timestamp_pb2.Timestamp(seconds=1_777_637_100),
    )
    assert render.order_details(order).splitlines() == [
        "status:      failed",
        "group id:    737",
        "quantity:    2",
        "numbers:     -",
        "note:        settled as failed: not in console",
        "app id:      (account default)",
        f"request id:  {ORDER_ID}",
        "upstream id: api-1",
        "caller:      alice",
        "created:     2026-05-01T12:00:03.250Z",
        "updated:     2026-05-01T12:05:00Z",
    ]


# --- progress bar -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("received", "total", "line"),
    [
        (0, 260, "[..........] 0/260 groups  0%"),
        (140, 260, "[#####.....] 140/260 groups  53%"),  # rounds down
        (259, 260, "[#########.] 259/260 groups  99%"),  # 100% only when all came
        (260, 260, "[##########] 260/260 groups  100%"),
        (300, 260, "[##########] 300/260 groups  100%"),  # upstream counted again: full
        (140, 0, "streaming: 140 groups (total unknown)"),
        (1, 0, "streaming: 1 group (total unknown)"),
    ],
)
def test_progress_bar(received: int, total: int, line: str) -> None:
    assert render.progress_bar(received, total, width=10) == line


def test_progress_bar_is_thirty_wide_by_default() -> None:
    line = render.progress_bar(13, 26)
    assert line == "[" + "#" * 15 + "." * 15 + "] 13/26 groups  50%"
    assert "\x1b" not in line  # never coloured


# --- colour -----------------------------------------------------------------------------------


def test_plain_style_leaves_text_alone_and_colour_wraps_it() -> None:
    assert render.PLAIN.paint("failed", "red") == "failed"
    assert COLOUR.paint("failed", "red") == f"{RED}failed{RESET}"
    assert COLOUR.paint("x", None) == "x"
    assert COLOUR.paint("", "red") == ""  # nothing to mark: no stray codes


def test_coloured_groups_table_lines_up_as_the_plain_one() -> None:
    groups = [sample_group(), sample_group(group_id="5", stock=7, region="", sms_rate=None)]
    coloured = render.groups_table(groups, COLOUR)
    assert coloured != render.groups_table(groups)
    assert strip_ansi(coloured) == render.groups_table(groups)
    header = coloured.splitlines()[0]
    assert header.startswith(f"{BOLD}GROUP ID{RESET}        {BOLD}TYPE{RESET}")
    assert header.endswith(f"{BOLD}SMS{RESET}")  # right-aligned: padding before the codes
    assert "\x1b" not in "".join(coloured.splitlines()[1:])  # group rows have no colour


def orders_of_every_status() -> list[pb.RentalOrder]:
    return [
        sample_order(),
        sample_order(status=pb.ORDER_STATUS_PENDING, upstream_status="pending", quantity=12),
        sample_order(status=pb.ORDER_STATUS_OUTCOME_UNKNOWN, upstream_status="", numbers=[]),
        sample_order(status=pb.ORDER_STATUS_FAILED, upstream_status="failed", caller=""),
        # A status this client does not know shows upstream's text, uncoloured even when that
        # text reads like a known one.
        sample_order(status=pb.ORDER_STATUS_UNSPECIFIED, upstream_status="fulfilled"),
    ]


def test_coloured_orders_table_colours_each_status_and_lines_up_as_the_plain_one() -> None:
    orders = orders_of_every_status()
    plain = render.orders_table(orders)
    coloured = render.orders_table(orders, COLOUR)
    assert strip_ansi(coloured) == plain
    status_at = plain.splitlines()[0].index("STATUS")
    cells = [line[status_at:].split("  ")[0] for line in coloured.splitlines()[1:]]
    assert cells == [
        f"{GREEN}fulfilled{RESET}",
        f"{YELLOW}pending{RESET}",
        f"{RED}outcome unknown{RESET}",
        f"{RED}failed{RESET}",
        "fulfilled",
    ]


def test_order_row_colours_colour_the_status_cell_only() -> None:
    colours = render.order_row_colours(sample_order())
    assert len(colours) == len(render.ORDERS_TABLE.headers)
    assert [c for c in colours if c] == ["green"]
    assert colours[render.ORDERS_TABLE.headers.index("STATUS")] == "green"


def test_coloured_streamed_table_lines_up_as_the_plain_one() -> None:
    table = render.Table(headers=("A", "STATUS", "N"), right_aligned=frozenset({2}))
    batches = [[("xx", "ok", "1")], [("x", "failed", "10")], [("xxxx", "ok", "2")]]
    colours: list[list[tuple[render.Colour | None, ...]]] = [
        [(None, "green", None)],
        [(None, "red", None)],
        [(None, "green", None)],
    ]
    plain, coloured = render.StreamedTable(table), render.StreamedTable(table)
    for rows, row_colours in zip(batches, colours, strict=True):
        painted = coloured.add(rows, style=COLOUR, colours=row_colours)
        assert strip_ansi(painted) == plain.add(rows)
    assert coloured.widths == plain.widths
    first = render.StreamedTable(table).add(batches[0], style=COLOUR, colours=colours[0])
    assert first.splitlines() == [
        f"{BOLD}A{RESET}   {BOLD}STATUS{RESET}  {BOLD}N{RESET}",
        f"xx  {GREEN}ok{RESET}      1",
    ]


def test_a_coloured_last_cell_leaves_no_trailing_padding() -> None:
    table = render.Table(headers=("A", "STATUS"))
    rows = [("x", "ok"), ("y", "failed")]
    coloured = table.render(rows, style=COLOUR, colours=[(None, "green"), (None, "red")])
    assert coloured.splitlines()[1] == f"x  {GREEN}ok{RESET}"
    assert strip_ansi(coloured) == table.render(rows)


def test_coloured_order_details_colour_the_status_and_each_number() -> None:
    order = sample_order(
        numbers=[
            pb.RentedNumber(e164="+12125550100", status=pb.RENTED_NUMBER_STATUS_SUCCESS),
            pb.RentedNumber(
                e164="+12125550101",
                status=pb.RENTED_NUMBER_STATUS_FAILED,
                upstream_status="Failed",
            ),
            pb.RentedNumber(e164="+12125550102", upstream_status="Queued"),
        ],
        upstream_status="Fulfilled",
    )
    coloured = render.order_details(order, COLOUR)
    assert strip_ansi(coloured) == render.order_details(order)
    assert coloured.splitlines()[:6] == [
        f"status:      {GREEN}fulfilled{RESET} (upstream: Fulfilled)",
        "group id:    737",
        "quantity:    2",
        f"numbers:     +12125550100  {GREEN}rented{RESET}",
        f"             +12125550101  {RED}failed{RESET} (upstream: Failed)",
        "             +12125550102  unknown (upstream: Queued)",
    ]


@pytest.mark.parametrize(
    ("status", "colour"),
    [
        (pb.ORDER_STATUS_PENDING, YELLOW),
        (pb.ORDER_STATUS_OUTCOME_UNKNOWN, RED),
        (pb.ORDER_STATUS_FAILED, RED),
    ],
)
def test_coloured_order_details_status_colours(
    status: pb.OrderStatus.ValueType, colour: str
) -> None:
    first = render.order_details(pb.RentalOrder(status=status), COLOUR).splitlines()[0]
    assert first.startswith(f"status:      {colour}")
    assert first.endswith(RESET)


def test_unknown_order_status_is_never_coloured() -> None:
    order = pb.RentalOrder(status=pb.ORDER_STATUS_UNSPECIFIED, upstream_status="backordered")
    assert render.order_details(order, COLOUR).splitlines()[0] == "status:      backordered"


def test_coloured_error_lines_colour_the_prefix_only() -> None:
    report = render.ErrorReport("UNAVAILABLE", "down", reason="X", hints=["try again"])
    assert render.error_lines(report, COLOUR) == [
        f"{RED}error:{RESET} UNAVAILABLE: down",
        "  reason: X",
        "hint: try again",
    ]
    assert render.error_line("no ledger", COLOUR) == f"{RED}error:{RESET} no ledger"
    assert render.error_line("no ledger") == "error: no ledger"
