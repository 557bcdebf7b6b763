"""What the command line prints: tables, key-value blocks, JSON and error lines. Pure.

Nothing here touches a channel, a stream or the clock: every function turns messages into
text, so every layout is tested with plain messages. Money is printed from `units` and `nanos`
with integer arithmetic only; a float would turn `0.0085` into `0.0084999...`.

Colour is a `Style` passed in (plain by default): whether a stream gets colour is decided once
by the caller, and a coloured table lines up exactly as the plain one (padding stays outside
the colour codes).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Final, Literal, TypeVar

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from google.type import money_pb2

from numbersvc.v1 import number_groups_pb2 as pb

__all__ = [
    "GROUPS_TABLE",
    "NUMBER_TYPES",
    "ORDERS_TABLE",
    "ORDER_STATUSES",
    "PLAIN",
    "SERVICES",
    "Colour",
    "ErrorReport",
    "StreamedTable",
    "Style",
    "Table",
    "error_line",
    "error_lines",
    "format_money",
    "group_details",
    "group_row",
    "groups_table",
    "json_line",
    "json_text",
    "list_footer",
    "order_details",
    "order_row",
    "order_row_colours",
    "orders_table",
    "progress_bar",
    "resume_hint",
    "stream_footer",
]

_V = TypeVar("_V", bound=int)
_NANOS_PER_UNIT: Final = 1_000_000_000
_MIN_DECIMALS: Final = 2
_CURRENCY_SYMBOLS: Final = {"USD": "$"}
_UNSET: Final = "-"
_NOTE_MAX_CHARS: Final = 40
_ELLIPSIS: Final = "..."
_PROGRESS_BAR_WIDTH: Final = 30


def _labels(items: Iterable[tuple[str, _V]], prefix: str) -> dict[str, _V]:
    """Map `NUMBER_TYPE_LOCAL` -> `local`, skipping the zero value; names come from the enum."""
    return {name.removeprefix(prefix).lower(): value for name, value in items if value}


NUMBER_TYPES: Final = _labels(pb.NumberType.items(), "NUMBER_TYPE_")
"""Command-line names of the number types: `local`, `national`, `tollfree`."""
SERVICES: Final = _labels(pb.NumberService.items(), "NUMBER_SERVICE_")
"""Command-line names of the services: `voice`, `sms`."""
_ORDER_STATUS_NAMES: Final = _labels(pb.OrderStatus.items(), "ORDER_STATUS_")
ORDER_STATUSES: Final = {**_ORDER_STATUS_NAMES, "unspecified": pb.ORDER_STATUS_UNSPECIFIED}
"""Command-line names of the order statuses: `fulfilled`, `pending`, `outcome_unknown`,
`failed`, and `unspecified` (an upstream status the server does not know)."""
_NUMBER_STATUSES: Final = {
    pb.RENTED_NUMBER_STATUS_SUCCESS: "rented",
    pb.RENTED_NUMBER_STATUS_FAILED: "failed",
}

Colour = Literal["bold", "green", "yellow", "red"]
"""What a piece of text is marked with on a terminal."""
_SGR: Final[Mapping[Colour, str]] = {"bold": "1", "green": "32", "yellow": "33", "red": "31"}
# By the enum value, never by the label: an unknown status shows upstream's text, uncoloured.
_ORDER_STATUS_COLOURS: Final[Mapping[int, Colour]] = {
    pb.ORDER_STATUS_FULFILLED: "green",
    pb.ORDER_STATUS_PENDING: "yellow",
    pb.ORDER_STATUS_OUTCOME_UNKNOWN: "red",
    pb.ORDER_STATUS_FAILED: "red",
}
_NUMBER_STATUS_COLOURS: Final[Mapping[int, Colour]] = {
    pb.RENTED_NUMBER_STATUS_SUCCESS: "green",
    pb.RENTED_NUMBER_STATUS_FAILED: "red",
}


@dataclass(frozen=True, slots=True)
class Style:
    """How text is marked: ANSI SGR codes when `colour`, else left exactly as it is.

    The caller decides `colour` once per stream (a terminal, `NO_COLOR` unset, not `--json`).
    """

    colour: bool = False

    def paint(self, text: str, colour: Colour | None) -> str:
        """Wrap `text` in the codes of `colour` (and a reset); unchanged when plain or empty."""
        if not self.colour or colour is None or not text:
            return text
        return f"\x1b[{_SGR[colour]}m{text}\x1b[0m"


PLAIN: Final = Style()
"""No colour: what every function here prints unless told otherwise."""


def _label(labels: Mapping[str, int], value: int, upstream: str = "") -> str:
    """Name an enum value; an unknown one (a newer server) shows the upstream text or number."""
    for name, known in labels.items():
        if known == value:
            return name.replace("_", " ")
    return upstream or f"unknown({value})"


def format_money(money: money_pb2.Money | None) -> str:
    """Print an amount exactly: `$0.80`, `$0.007`, `-$1.50`, `12.5 EUR` style; `-` when unset.

    At least two decimals, then as many as `nanos` needs (trailing zeros dropped).
    """
    if money is None:
        return _UNSET
    # NOTE: one integer of nanos, so mixed-sign (malformed) values still add up correctly.
    total = money.units * _NANOS_PER_UNIT + money.nanos
    whole, frac = divmod(abs(total), _NANOS_PER_UNIT)
    decimals = f"{frac:09d}".rstrip("0").ljust(_MIN_DECIMALS, "0")
    sign = "-" if total < 0 else ""
    symbol = _CURRENCY_SYMBOLS.get(money.currency_code)
    if symbol is not None:
        return f"{sign}{symbol}{whole}.{decimals}"
    suffix = f" {money.currency_code}" if money.currency_code else ""
    return f"{sign}{whole}.{decimals}{suffix}"


_RateField = Literal["rental_rate", "setup_rate", "voice_rate", "sms_rate"]


def _optional_money(group: pb.NumberGroup, field: _RateField) -> str:
    # A Money field that was never set reads as $0.00; `HasField` tells the two apart.
    if not group.HasField(field):
        return _UNSET
    money: money_pb2.Money = getattr(group, field)
    return format_money(money)


def _services(values: Iterable[int]) -> str:
    return ",".join(_label(SERVICES, v) for v in values) or _UNSET


def _number_type(group: pb.NumberGroup) -> str:
    return _label(NUMBER_TYPES, group.number_type, group.upstream_number_type)


_Colours = Sequence[Colour | None]
"""The colour of each cell of a row (None: plain)."""


@dataclass(frozen=True, slots=True)
class Table:
    """A plain-text table: left-aligned text, right-aligned numbers, two spaces between.

    With a colour `Style` the header is bold and cells take the colours given for their row;
    the padding is measured on the text and kept outside the codes, so columns still line up.
    """

    headers: Sequence[str]
    right_aligned: frozenset[int] = frozenset()

    def widths(self, rows: Iterable[Sequence[str]]) -> list[int]:
        """Return the width of each column: its widest cell or header."""
        widths = [len(h) for h in self.headers]
        for row in rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
        return widths

    def line(
        self,
        cells: Sequence[str],
        widths: Sequence[int],
        *,
        style: Style = PLAIN,
        colours: _Colours = (),
    ) -> str:
        """One row laid out on `widths` (a longer cell pushes the rest right rather than cut).

        `colours` holds the colour of each cell; empty, the row is plain.
        """
        colours = colours or [None] * len(cells)
        padded = []
        for i, (cell, width, colour) in enumerate(zip(cells, widths, colours, strict=True)):
            pad, text = " " * (width - len(cell)), style.paint(cell, colour)
            padded.append(pad + text if i in self.right_aligned else text + pad)
        return "  ".join(padded).rstrip()

    def header(self, widths: Sequence[int], *, style: Style = PLAIN) -> str:
        """Lay out the header row on `widths`, bold with a colour style."""
        return self.line(self.headers, widths, style=style, colours=["bold"] * len(self.headers))

    def render(
        self,
        rows: Sequence[Sequence[str]],
        widths: Sequence[int] | None = None,
        *,
        style: Style = PLAIN,
        colours: Sequence[_Colours] | None = None,
    ) -> str:
        """Lay out the header and every row, newline-separated, without a trailing newline.

        `colours`, when given, holds the cell colours of each row in `rows`.
        """
        widths = widths or self.widths(rows)
        lines = [self.header(widths, style=style)]
        for cells, row_colours in zip(rows, colours or [()] * len(rows), strict=True):
            lines.append(self.line(cells, widths, style=style, colours=row_colours))
        return "\n".join(lines)


@dataclass(slots=True)
class StreamedTable:
    """A table printed one batch of rows at a time, as pages arrive.

    The first batch sets the widths for good and carries the header, so every later row lines
    up with it; a later, wider cell pushes the rest of its own row only (widening a column
    after its header was printed would shift every row below it, and none above).
    """

    table: Table
    widths: list[int] | None = None

    def add(
        self,
        rows: Sequence[Sequence[str]],
        *,
        style: Style = PLAIN,
        colours: Sequence[_Colours] | None = None,
    ) -> str:
        """Lay out one batch (after the header, if it is the first) on the first batch's widths.

        `style` and `colours` as for `Table.render`.
        """
        lines = []
        if self.widths is None:
            self.widths = self.table.widths(rows)
            lines.append(self.table.header(self.widths, style=style))
        for cells, row_colours in zip(rows, colours or [()] * len(rows), strict=True):
            lines.append(self.table.line(cells, self.widths, style=style, colours=row_colours))
        return "\n".join(lines)


GROUPS_TABLE: Final = Table(
    headers=(
        "GROUP ID",
        "TYPE",
        "PREFIX",
        "REGION",
        "SERVICES",
        "STOCK",
        "MONTHLY",
        "SETUP",
        "VOICE/MIN",
        "SMS",
    ),
    right_aligned=frozenset(range(5, 10)),
)


def group_row(group: pb.NumberGroup) -> tuple[str, ...]:
    """Return the cells of one group in `GROUPS_TABLE`."""
    return (
        group.group_id,
        _number_type(group),
        group.prefix or _UNSET,
        group.region or _UNSET,
        _services(group.services),
        str(group.stock),
        _optional_money(group, "rental_rate"),
        _optional_money(group, "setup_rate"),
        _optional_money(group, "voice_rate"),
        _optional_money(group, "sms_rate"),
    )


def groups_table(groups: Iterable[pb.NumberGroup], style: Style = PLAIN) -> str:
    """Lay out groups as a table, header first, columns as wide as their widest cell."""
    return GROUPS_TABLE.render([group_row(g) for g in groups], style=style)


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def list_footer(shown: int, total: int, next_page_token: str, *, noun: str = "group") -> str:
    """Say under a listed table how many of how many `noun`s, and how to get the next page."""
    where = f"next page: --page-token {next_page_token}" if next_page_token else "last page"
    return f"{shown} of {_count(total, noun)}; {where}"


def stream_footer(received: int, total: int, next_page_token: str) -> str:
    """Say after a streamed table how many came; a token means it stopped early (max results)."""
    line = f"{_count(received, 'group')} streamed of {total}"
    return f"{line}; more: --page-token {next_page_token}" if next_page_token else line


def progress_bar(
    received: int, total: int, *, noun: str = "group", width: int = _PROGRESS_BAR_WIDTH
) -> str:
    """Return the live progress line of `stream` on a terminal: `[###...] 140/260 groups  53%`.

    The percentage rounds down, so 100% means all of `total` came; more than `total` (upstream
    counted again) shows a full bar. Without a total (0) there is no bar, only the count.
    """
    if total <= 0:
        return f"streaming: {_count(received, noun)} (total unknown)"
    done = min(received, total)
    filled = done * width // total
    percent = done * 100 // total
    return f"[{'#' * filled}{'.' * (width - filled)}] {received}/{_count(total, noun)}  {percent}%"


def resume_hint(received: int, next_page_token: str, *, noun: str = "group") -> str:
    """Tell how to resume a walk that broke after `received` `noun`s."""
    return f"{_count(received, noun)} received; resume with --page-token {next_page_token}"


def _key_values(pairs: Iterable[tuple[str, str | Sequence[str]]]) -> str:
    """Aligned `key: value` lines; a sequence value continues on indented lines."""
    pairs = list(pairs)
    width = max(len(key) for key, _ in pairs) + 2
    lines = []
    for key, value in pairs:
        values = [value] if isinstance(value, str) else list(value) or [_UNSET]
        lines.append(f"{key + ':':<{width}}{values[0]}")
        lines.extend(" " * width + more for more in values[1:])
    return "\n".join(lines)


def group_details(group: pb.NumberGroup) -> str:
    """Show one group as a key-value block (the `get` command)."""
    cells = dict(zip(GROUPS_TABLE.headers, group_row(group), strict=True))
    return _key_values(
        [
            ("group id", group.group_id),
            ("type", cells["TYPE"]),
            ("prefix", cells["PREFIX"]),
            ("region", cells["REGION"]),
            ("country", group.region_code or _UNSET),
            ("stock", cells["STOCK"]),
            ("services", cells["SERVICES"]),
            ("monthly", cells["MONTHLY"]),
            ("setup", cells["SETUP"]),
            ("voice/min", cells["VOICE/MIN"]),
            ("sms", cells["SMS"]),
        ]
    )


def _e164(number: pb.RentedNumber) -> str:
    return number.e164 or "+" + number.number


def _rented_number(number: pb.RentedNumber, style: Style) -> str:
    status = _NUMBER_STATUSES.get(number.status, "unknown")
    upstream = f" (upstream: {number.upstream_status})" if status != "rented" else ""
    painted = style.paint(status, _NUMBER_STATUS_COLOURS.get(number.status))
    return f"{_e164(number)}  {painted}{upstream}"


def _order_status(order: pb.RentalOrder) -> str:
    return _label(_ORDER_STATUS_NAMES, order.status, order.upstream_status)


def _order_status_colour(order: pb.RentalOrder) -> Colour | None:
    return _ORDER_STATUS_COLOURS.get(order.status)


def _utc_seconds(stamp: timestamp_pb2.Timestamp) -> str:
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(text: str, max_chars: int) -> str:
    """Fold whitespace (newlines too) and cut to `max_chars`, marking the cut.

    The cut falls between words when a space lies in the second half; else inside a word.
    """
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    head = text[: max_chars - len(_ELLIPSIS)]
    space = head.rfind(" ")
    if text[len(head)] != " " and space > len(head) // 2:
        head = head[:space]
    return head.rstrip() + _ELLIPSIS


ORDERS_TABLE: Final = Table(
    headers=("REQUEST ID", "CREATED", "STATUS", "GROUP ID", "QTY", "NUMBERS", "CALLER", "NOTE"),
    right_aligned=frozenset({4}),
)


def order_row(order: pb.RentalOrder) -> tuple[str, ...]:
    """Return the cells of one order in `ORDERS_TABLE`.

    Created in UTC to the second, numbers in E.164, the status message cut to one short line.
    """
    return (
        order.request_id,
        _utc_seconds(order.create_time) if order.HasField("create_time") else _UNSET,
        _order_status(order),
        order.group_id or _UNSET,
        str(order.quantity),
        ",".join(_e164(n) for n in order.numbers) or _UNSET,
        order.caller or _UNSET,
        _one_line(order.status_message, _NOTE_MAX_CHARS) or _UNSET,
    )


_ORDER_STATUS_COLUMN: Final = ORDERS_TABLE.headers.index("STATUS")


def order_row_colours(order: pb.RentalOrder) -> tuple[Colour | None, ...]:
    """Return the colours of the cells of `order_row(order)`: its status only."""
    return tuple(
        _order_status_colour(order) if i == _ORDER_STATUS_COLUMN else None
        for i in range(len(ORDERS_TABLE.headers))
    )


def orders_table(orders: Iterable[pb.RentalOrder], style: Style = PLAIN) -> str:
    """Lay out orders as a table, header first, columns as wide as their widest cell."""
    orders = list(orders)
    return ORDERS_TABLE.render(
        [order_row(o) for o in orders],
        style=style,
        colours=[order_row_colours(o) for o in orders],
    )


def order_details(order: pb.RentalOrder, style: Style = PLAIN) -> str:
    """Show an order as a key-value block: status, numbers in E.164, ids, pending details.

    The status message (`note`), caller and times appear only when the server sent them.
    """
    label = _order_status(order)
    status = style.paint(label, _order_status_colour(order))
    if order.upstream_status and order.upstream_status != label:
        status = f"{status} (upstream: {order.upstream_status})"
    pairs: list[tuple[str, str | Sequence[str]]] = [
        ("status", status),
        ("group id", order.group_id),
        ("quantity", str(order.quantity)),
        ("numbers", [_rented_number(n, style) for n in order.numbers]),
    ]
    if order.details:
        pairs.append(("details", order.details))
    if order.status_message:
        pairs.append(("note", order.status_message))
    pairs += [
        ("app id", order.app_id or "(account default)"),
        ("request id", order.request_id),
        ("upstream id", order.upstream_request_id or _UNSET),
    ]
    if order.caller:
        pairs.append(("caller", order.caller))
    if order.HasField("create_time"):
        pairs.append(("created", order.create_time.ToJsonString()))
    if order.HasField("update_time"):
        pairs.append(("updated", order.update_time.ToJsonString()))
    return _key_values(pairs)


def _as_dict(message: Message) -> dict[str, object]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def json_text(message: Message) -> str:
    """Return a whole response as indented JSON (proto3 JSON mapping, proto field names)."""
    return json.dumps(_as_dict(message), indent=2)


def json_line(message: Message) -> str:
    """Return one message as a single JSON line (the JSON-lines output of `stream`)."""
    return json.dumps(_as_dict(message), separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """A failed call, decoded from its rich status, ready to print."""

    code: str
    """The gRPC status code name, such as `INVALID_ARGUMENT`."""
    message: str
    reason: str = ""
    metadata: Mapping[str, str] | None = None
    violations: Sequence[tuple[str, str]] = ()
    """Bad request fields as (field path, description)."""
    retry_delay_seconds: float | None = None
    resource: str = ""
    hints: Sequence[str] = ()
    """Advice for the user, one line each, printed last."""


def error_line(message: str, style: Style = PLAIN) -> str:
    """Return `error: message`, the prefix red with a colour style."""
    return f"{style.paint('error:', 'red')} {message}"


def error_lines(report: ErrorReport, style: Style = PLAIN) -> list[str]:
    """Return the stderr lines for a failed call: `error: CODE: message`, then details."""
    lines = [error_line(f"{report.code}: {report.message}", style)]
    if report.reason:
        lines.append(f"  reason: {report.reason}")
    lines.extend(f"  {field}: {description}" for field, description in report.violations)
    if report.resource:
        lines.append(f"  resource: {report.resource}")
    if report.retry_delay_seconds is not None:
        lines.append(f"  retry after: {report.retry_delay_seconds:g} s")
    if report.metadata:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(report.metadata.items()))
        lines.append(f"  metadata: {shown}")
    lines.extend(f"hint: {hint}" for hint in report.hints)
    return lines
