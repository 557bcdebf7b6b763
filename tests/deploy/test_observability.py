"""deploy/observability agrees with the code: the alerting rules and the Grafana dashboard.

`promtool` (Debian's `prometheus` package; `make promtool` extracts it into the venv) checks the
rules, runs their unit tests (series in, alerts out) and parses every dashboard query. A real
server, after a few real calls, is scraped: every metric and label that a rule or a dashboard
query names must be one it exports, every label value in a matcher one the code can produce,
and every family it exports must be on the dashboard. Its scrapes before and after a rent
refused with 401 and one whose outcome is unknown, fed to promtool, fire the matching alerts.

PromQL is read by a small tokenizer, enough for selectors (`name{label op "value"}`), range
and offset durations, function calls and `by`/`without`/`on`/`ignoring`/`group_*` clauses;
promtool has already checked the syntax, so the tokenizer only has to find the names.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from numbersvc.config import Secret
from numbersvc.ledger import OrderState
from numbersvc.ledger.budget import BudgetSource
from numbersvc.sandbox import SandboxControl, SandboxServer
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.server import create_server, method_permissions
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.ci import require
from tests.e2e.conftest import config_for

ROOT: Final = Path(__file__).resolve().parents[2]
OBS_DIR: Final = ROOT / "deploy" / "observability"
ALERTS: Final = OBS_DIR / "alerts.yaml"
ALERT_TESTS: Final = OBS_DIR / "alerts.test.yaml"
DASHBOARD: Final = OBS_DIR / "dashboard.json"
PROMETHEUS_CONFIG: Final = OBS_DIR / "prometheus.yaml"
SEVERITIES: Final = frozenset({"critical", "warning"})
MIN_FOR_SECONDS: Final = 60
US: Final = pb.SearchFilter(region_code="US")

# Series Prometheus makes itself, with the labels they carry beyond the target labels.
BUILTIN_SERIES: Final = {
    "up": frozenset(),
    "ALERTS": frozenset({"alertname", "alertstate", "severity"}),
}
# Grafana's own variables, as a test evaluation would expand them.
GRAFANA_BUILTINS: Final = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
GROUPING_KEYWORDS: Final = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right"}
)
OPERATOR_KEYWORDS: Final = frozenset({"and", "or", "unless", "bool", "offset", "atan2"})
MATCH_OPERATORS: Final = frozenset({"=", "!=", "=~", "!~"})


# --- promtool --------------------------------------------------------------------------------


def promtool() -> str:
    """The promtool on PATH or beside this Python (`make promtool`); CI fails without one."""
    found = shutil.which("promtool") or shutil.which(
        "promtool", path=str(Path(sys.executable).parent)
    )
    return require(found, "promtool not found: run `make promtool` (Debian's prometheus package)")


def run_promtool(*args: str) -> None:
    result = subprocess.run(
        [promtool(), *args], cwd=OBS_DIR, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


# --- reading the files -----------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def variables() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = dashboard()["templating"]["list"]
    return found


def expand(expr: str) -> str:
    """A dashboard query as Prometheus would get it: `$var` and `${var}` replaced.

    Regex variables (`=~"$job"`) become `.*`, a textbox its default, Grafana's intervals a
    duration; an unknown variable fails.
    """
    values = dict(GRAFANA_BUILTINS)
    for variable in variables():
        if variable["type"] == "query":
            values[variable["name"]] = ".*"
        elif variable["type"] == "textbox":
            values[variable["name"]] = variable["query"]

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown dashboard variable ${name} in {expr!r}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable, expanded."""
    queries = [
        (f"panel {panel['title']!r} target {target['refId']}", expand(target["expr"]))
        for panel in panels()
        for target in panel["targets"]
    ]
    for variable in variables():
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert match, f"variable {variable['name']}: expected label_values(selector, label)"
            # As an aggregation, the label is checked like any grouping label.
            selector, label = expand(match.group(1)), match.group(2)
            queries.append((f"variable {variable['name']}", f"count by ({label}) ({selector})"))
    return queries


def prometheus_job() -> dict[str, Any]:
    jobs: list[dict[str, Any]] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    assert len(jobs) == 1, "prometheus.yaml: expected the one numbersvc job"
    return jobs[0]


def target_labels() -> frozenset[str]:
    """Labels Prometheus attaches to every series of the job: job, instance, relabelled ones."""
    relabelled = {
        rule["target_label"]
        for rule in prometheus_job().get("relabel_configs", [])
        if rule.get("action", "replace") == "replace"
    }
    return frozenset({"job", "instance", *relabelled})


# --- PromQL ----------------------------------------------------------------------------------

_TOKEN: Final = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<punct>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){}\[\],:@])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Matcher:
    """`label op "value"` inside a selector's braces."""

    label: str
    op: str
    value: str


@dataclass(frozen=True)
class Selector:
    """A metric name with its matchers."""

    metric: str
    matchers: tuple[Matcher, ...]


@dataclass(frozen=True)
class Query:
    """What a PromQL expression names: selectors, and labels of grouping and matching clauses."""

    selectors: tuple[Selector, ...]
    grouping: frozenset[str]


def tokens(expr: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        assert match, f"cannot read PromQL at {expr[position : position + 20]!r} in {expr!r}"
        assert match.lastgroup is not None
        if match.lastgroup != "space":
            found.append((match.lastgroup, match.group()))
        position = match.end()
    return found


def parse(expr: str) -> Query:
    """Find the selectors and the grouping labels of `expr`."""
    toks = tokens(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "punct" and text == "[":
            i = toks.index(("punct", "]"), i)  # a range or subquery: durations only
        elif kind == "ident" and text in GROUPING_KEYWORDS and following == "(":
            close = toks.index(("punct", ")"), i)
            grouping.update(t for k, t in toks[i + 2 : close] if k == "ident")
            i = close
        elif (kind == "ident" and following in {"(", "by", "without"}) or text in GROUPING_KEYWORDS:
            pass  # a function or an aggregation, or group_left/right without labels
        elif kind == "ident" and text not in OPERATOR_KEYWORDS:
            matchers: list[Matcher] = []
            if following == "{":
                i, matchers = _matchers(toks, i + 2, expr)
            selectors.append(Selector(text, tuple(matchers)))
        else:
            assert text != "{", f"a selector without a metric name in {expr!r}"
        i += 1
    return Query(tuple(selectors), frozenset(grouping))


def _matchers(toks: list[tuple[str, str]], i: int, expr: str) -> tuple[int, list[Matcher]]:
    """Read `label op "value", ...}` from toks[i]; return the index of `}` and the matchers."""
    matchers: list[Matcher] = []
    while toks[i] != ("punct", "}"):
        (label_kind, label), (_, op), (value_kind, value) = toks[i : i + 3]
        where = f"the matcher at {label!r} in {expr!r}"
        assert (label_kind, value_kind) == ("ident", "string"), f"cannot read {where}"
        assert op in MATCH_OPERATORS, f"cannot read {where}"
        matchers.append(Matcher(label, op, value[1:-1]))
        i += 4 if toks[i + 3] == ("punct", ",") else 3
    return i, matchers


def alternatives(regex: str) -> list[str]:
    """`a|b` and `x(a|b)y` spelled out, so that each alternative is checked on its own."""
    group = re.search(r"\(([^()]*\|[^()]*)\)", regex)
    if group:
        return [
            expanded
            for choice in group.group(1).split("|")
            for expanded in alternatives(regex[: group.start()] + choice + regex[group.end() :])
        ]
    if "(" not in regex:
        return regex.split("|")
    return [regex]


def problems(
    expr: str,
    exported: Mapping[str, frozenset[str]],
    vocabularies: Mapping[str, frozenset[str]],
    extra_labels: frozenset[str],
) -> list[str]:
    """What `expr` names that the server does not export, as readable lines.

    Args:
        expr: PromQL, with no template variables left.
        exported: every sample name (`x_total`, `x_bucket`, ...) and its label names.
        vocabularies: the values a label can take, where the code fixes them.
        extra_labels: labels Prometheus adds to every series (job, instance, ...).
    """
    query = parse(expr)
    found: list[str] = []
    known: set[str] = set(extra_labels)
    for selector in query.selectors:
        if selector.metric not in exported:
            found.append(f"{selector.metric}: no such series")
            continue
        labels = exported[selector.metric] | extra_labels
        known |= labels
        for matcher in selector.matchers:
            if matcher.label not in labels:
                found.append(f"{selector.metric}: no label {matcher.label}")
            elif matcher.label in vocabularies:
                found += _value_problems(selector.metric, matcher, vocabularies[matcher.label])
    found += [f"{label}: no series here has it" for label in sorted(query.grouping - known)]
    return found


def _value_problems(metric: str, matcher: Matcher, values: frozenset[str]) -> list[str]:
    regex = matcher.op in {"=~", "!~"}
    choices = alternatives(matcher.value) if regex else [matcher.value]
    return [
        f"{metric}: {matcher.label}{matcher.op}{matcher.value!r}: {choice!r} matches no value"
        for choice in choices
        if not any(re.fullmatch(choice if regex else re.escape(choice), v) for v in values)
    ]


# --- the rules and the dashboard on their own ------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    run_promtool("check", "rules", ALERTS.name)


def test_every_alert_fires_and_stays_silent_in_its_unit_tests() -> None:
    run_promtool("test", "rules", ALERT_TESTS.name)
    cases = [
        case
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    for rule in alert_rules():
        name = rule["alert"]
        outcomes = {bool(case["exp_alerts"]) for case in cases if case["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: no unit test where it fires and one where not"


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{n}", "expr": expr}
        for n, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard_queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(path))


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[unit] for n, unit in re.findall(r"(\d+)(ms|[smhd])", duration))


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_says_what_to_do(rule: dict[str, Any]) -> None:
    assert rule["alert"].startswith("Numbersvc")
    assert rule["labels"]["severity"] in SEVERITIES
    assert _seconds(rule.get("for", "0s")) >= MIN_FOR_SECONDS, "a for: keeps it from flapping"
    for key in ("summary", "description", "runbook"):
        assert len(rule["annotations"].get(key, "").split()) >= 5, f"{key}: say more"


def test_runbooks_point_at_sections_that_exist() -> None:
    """A runbook's `path.md, "Heading"` names a file and a heading in it."""
    pointers = [
        (rule["alert"], path, heading)
        for rule in alert_rules()
        for path, heading in re.findall(
            r'([\w/.-]+\.md), "([^"]+)"', rule["annotations"]["runbook"]
        )
    ]
    assert pointers, "expected at least one runbook to point at the docs"
    for alert, path, heading in pointers:
        headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.MULTILINE)
        assert heading in headings, f"{alert}: no section {heading!r} in {path}"


def test_deploy_readme_lists_every_alert_with_its_severity() -> None:
    rows = re.findall(
        r"^\| `(Numbersvc\w+)` \| (\w+) \|", (ROOT / "deploy" / "README.md").read_text(), re.M
    )
    assert rows == [(rule["alert"], rule["labels"]["severity"]) for rule in alert_rules()]


def test_alert_names_are_unique() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))


def test_the_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() -> None:
    document = dashboard()
    assert document["schemaVersion"] >= 39
    assert document["uid"]
    assert document["title"]
    [datasource] = [v for v in variables() if v["type"] == "datasource"]
    assert datasource["query"] == "prometheus"
    reference = {"type": "prometheus", "uid": f"${{{datasource['name']}}}"}
    for panel in panels():
        assert panel["datasource"] == reference, f"{panel['title']}: not on ${datasource['name']}"
        assert panel["targets"], f"{panel['title']}: no query"
        assert all(target["datasource"] == reference for target in panel["targets"])
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_the_alerts_select_the_job_prometheus_yaml_scrapes() -> None:
    assert prometheus_job()["job_name"] == "numbersvc"
    assert yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"] == [ALERTS.name]
    jobs = {
        matcher.value
        for rule in alert_rules()
        for selector in parse(rule["expr"]).selectors
        for matcher in selector.matchers
        if matcher.label == "job"
    }
    assert jobs == {prometheus_job()["job_name"]}


# --- the checker can fail --------------------------------------------------------------------

TOY_EXPORT: Final = {
    "numbersvc_rpcs_total": frozenset({"method", "code"}),
    "numbersvc_rpc_duration_seconds_bucket": frozenset({"method", "le"}),
}
TOY_VOCABULARY: Final = {"code": frozenset({"OK", "INTERNAL"})}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("rate(numbersvc_rpc_total[5m])", ["numbersvc_rpc_total: no such series"]),
        ('numbersvc_rpcs_total{operation="get"}', ["numbersvc_rpcs_total: no label operation"]),
        ("sum by (methd) (rate(numbersvc_rpcs_total[5m]))", ["methd: no series here has it"]),
        ("sum by (le) (numbersvc_rpcs_total)", ["le: no series here has it"]),
        (
            'numbersvc_rpcs_total{code=~"OK|INTERNL"}',
            ["numbersvc_rpcs_total: code=~'OK|INTERNL': 'INTERNL' matches no value"],
        ),
        (
            'numbersvc_rpcs_total{code!="Ok"}',
            ["numbersvc_rpcs_total: code!='Ok': 'Ok' matches no value"],
        ),
        (
            "histogram_quantile(0.99, sum by (method, le) "
            '(rate(numbersvc_rpc_duration_seconds_bucket{job="x"}[5m] offset 1h)))'
            ' / on (method) group_left sum by (method) (numbersvc_rpcs_total{code=~"OK|INTERNAL"})',
            [],
        ),
    ],
)
def test_the_checker_finds_what_is_not_exported(expr: str, expected: list[str]) -> None:
    assert problems(expr, TOY_EXPORT, TOY_VOCABULARY, frozenset({"job", "instance"})) == expected


def test_alternatives_spell_out_each_choice() -> None:
    assert alternatives(".*/(Get|List)Orders") == [".*/GetOrders", ".*/ListOrders"]
    assert alternatives("a|b") == ["a", "b"]


# --- against a real server -------------------------------------------------------------------


@dataclass(frozen=True)
class Serving:
    """A real server on the sandbox: a stub, the sandbox's fault control and a scraper."""

    stub: pb_grpc.NumberGroupServiceAsyncStub
    control: SandboxControl
    metrics_url: str

    async def scrape(self) -> str:
        async with httpx.AsyncClient() as client:
            response = await client.get(self.metrics_url)
        response.raise_for_status()
        return response.text

    async def group_id(self) -> str:
        page = await self.stub.ListNumberGroups(pb.ListNumberGroupsRequest(filter=US))
        return page.number_groups[0].group_id

    async def failed_rent(self, status: int) -> None:
        """A rent that Plivo answers with `status`."""
        group_id = await self.group_id()
        await self.control.inject_fault(
            FaultSpec(FaultKind.STATUS, status=status, operation="rent")
        )
        rent = pb.RentNumbersRequest(group_id=group_id, request_id=str(uuid.uuid4()))
        with pytest.raises(grpc.aio.AioRpcError):
            await self.stub.RentNumbers(rent)


@contextlib.asynccontextmanager
async def serving(database_url: str = "") -> AsyncIterator[Serving]:
    """A server on a ledger file, or on PostgreSQL at `database_url`: it keeps the rate budget
    there, and exports its metrics."""
    with tempfile.TemporaryDirectory() as folder:
        async with serving_in(Path(folder), database_url) as server:
            yield server


@contextlib.asynccontextmanager
async def serving_in(folder: Path, database_url: str = "") -> AsyncIterator[Serving]:
    async with SandboxServer(host="127.0.0.1", port=0) as sandbox:
        running = await create_server(
            config_for(
                sandbox,
                ledger_path=str(folder / "ledger.sqlite3"),
                database_url=Secret(database_url),
            )
        )
        try:
            async with (
                SandboxControl(sandbox.base_url) as control,
                grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
            ):
                assert running.metrics_server is not None
                url = f"http://127.0.0.1:{running.metrics_server.port}/metrics"
                yield Serving(pb_grpc.NumberGroupServiceStub(channel), control, url)
        finally:
            await running.stop(grace_seconds=0.5)


async def _scrape_after_calls(database_url: str = "") -> str:
    """A real server's /metrics after a list, a stream, a retried get and a failed rent."""
    async with serving(database_url) as server:
        request = pb.StreamNumberGroupsRequest(filter=US, max_results=3)
        [_ async for _ in server.stub.StreamNumberGroups(request)]
        group_id = await server.group_id()
        await server.control.inject_fault(FaultSpec(FaultKind.STATUS, status=503, operation="get"))
        await server.stub.GetNumberGroup(pb.GetNumberGroupRequest(group_id=group_id))
        await server.failed_rent(401)
        return await server.scrape()


def exported_series(text: str) -> tuple[dict[str, frozenset[str]], dict[str, list[str]]]:
    """(sample name -> its label names, family name -> its sample names) from a scrape."""
    labels: dict[str, set[str]] = {}
    families: dict[str, list[str]] = {}
    for family in text_string_to_metric_families(text):
        assert family.samples, f"{family.name}: no series yet: make a call that creates one"
        families[family.name] = sorted({sample.name for sample in family.samples})
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(names) for name, names in labels.items()}, families


def label_values(text: str, label: str) -> frozenset[str]:
    return frozenset(
        sample.labels[label]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if label in sample.labels
    )


def everything_queried() -> Iterator[tuple[str, str]]:
    yield from ((f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules())
    yield from dashboard_queries()


async def test_rules_and_dashboard_name_only_what_a_real_server_exports(postgres_url: str) -> None:
    # Each store exports its own series (PostgreSQL's connection pool): both are checked.
    text = await _scrape_after_calls() + await _scrape_after_calls(postgres_url)
    exported, families = exported_series(text)
    alerts = alert_rules()
    extra = target_labels()
    series = {**exported, **BUILTIN_SERIES}
    vocabularies = {
        "method": frozenset(method_permissions(with_reflection=True)),
        "code": frozenset(code.name for code in grpc.StatusCode),
        "outcome": frozenset(state.value for state in OrderState),
        "source": frozenset(source.value for source in BudgetSource),
        "operation": label_values(text, "operation"),
        "store": label_values(text, "store"),
        "alertname": frozenset(rule["alert"] for rule in alerts),
        "alertstate": frozenset({"pending", "firing"}),
        "severity": SEVERITIES,
        "job": frozenset({prometheus_job()["job_name"]}),
    }
    assert vocabularies["operation"] == {"search", "get", "rent"}
    assert vocabularies["store"] == {"sqlite", "postgresql"}
    found = [
        f"{where}: {problem}"
        for where, expr in everything_queried()
        for problem in problems(expr, series, vocabularies, extra)
    ]
    assert not found, "\n".join(found)
    on_dashboard = {
        selector.metric for _, expr in dashboard_queries() for selector in parse(expr).selectors
    }
    # prometheus_client's `x_created` (when a series was first seen) rides along with `x`.
    shown = [
        n for n in families if not (n.endswith("_created") and n[: -len("_created")] in families)
    ]
    missing = [name for name in shown if not on_dashboard & set(families[name])]
    assert not missing, f"exported but on no dashboard panel: {missing}"


def as_input_series(scrapes: list[str], minutes_each: int) -> list[dict[str, str]]:
    """promtool input series holding each scrape's values for `minutes_each` minutes in turn.

    A series missing from a scrape is missing (`_`) for that stretch, as Prometheus saw it.
    """
    values: dict[str, list[float | None]] = {}
    for n, text in enumerate(scrapes):
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {
                    **sample.labels,
                    "job": prometheus_job()["job_name"],
                    "instance": "a:9464",
                }
                matchers = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
                values.setdefault(f"{sample.name}{{{matchers}}}", [None] * len(scrapes))[n] = (
                    sample.value
                )
    return [
        {
            "series": series,
            "values": " ".join(
                "_" if v is None else f"{v!r}" for v in per_scrape for _ in range(minutes_each)
            ),
        }
        for series, per_scrape in values.items()
    ]


async def test_alerts_fire_on_what_a_real_server_exports(tmp_path: Path) -> None:
    """Scrapes before and after a rent refused with 401 and one answered 503, as promtool input.

    The annotations are left out here (alerts.test.yaml checks them): what counts is that the
    label values the server writes (`status="401"`, `outcome="outcome_unknown"`) fire the alerts.
    """
    async with serving() as server:
        await server.group_id()
        before = await server.scrape()
        await server.failed_rent(401)
        await server.failed_rent(503)  # a rent's 5xx: its outcome is unknown
        after = await server.scrape()
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for rule in (rule for group in groups for rule in group["rules"]):
        del rule["annotations"]
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump({"groups": groups}))
    minutes_each = 10
    job = prometheus_job()["job_name"]
    expected = {
        "NumbersvcPlivoAuthFailing": {
            "job": job,
            "operation": "rent",
            "status": "401",
            "severity": "critical",
        },
        "NumbersvcRentOutcomeUnknown": {"job": job, "severity": "warning"},
    }
    tests = {
        "rule_files": ["alerts.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": as_input_series([before, after], minutes_each),
                "alert_rule_test": [
                    {
                        "eval_time": f"{minutes}m",
                        "alertname": name,
                        "exp_alerts": [{"exp_labels": alert} for alert in firing],
                    }
                    for name, labels in expected.items()
                    for minutes, firing in ((minutes_each - 1, []), (minutes_each + 5, [labels]))
                ],
            }
        ],
    }
    (tmp_path / "real.test.yaml").write_text(yaml.safe_dump(tests))
    run_promtool("test", "rules", str(tmp_path / "real.test.yaml"))
