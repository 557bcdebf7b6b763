"""Server settings: one frozen dataclass, fed by the environment and then by CLI flags.

Every setting has an environment variable and a flag, both derived from one declaration
(`Config`'s field metadata), so the table in docs/configuration.md, `numbersvc serve --help`
and the parser cannot drift apart. Durations are floats named `*_seconds`.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

# NOTE: every CLI command imports this module, so it imports nothing that loads httpx,
# aiohttp, grpc, protobuf or asyncio (a test checks): see `numbersvc.upstream.defaults`.
from numbersvc.callers import CALLERS_FILE_ENV
from numbersvc.upstream.defaults import DEFAULT_BASE_URL, HttpStack
from numbersvc.xfcc import IPNetwork, parse_networks

if TYPE_CHECKING:  # at run time, imported where used: it loads asyncio
    from numbersvc.upstream.ratelimit import RateSpec

__all__ = [
    "DEFAULT_SANDBOX_SEED",
    "LOG_FORMATS",
    "MAX_SECONDS",
    "Config",
    "ConfigError",
    "Secret",
    "Setting",
    "UpstreamKind",
    "add_arguments",
    "markdown_table",
    "parse_host_port",
    "settings",
]


DEFAULT_SANDBOX_SEED: Final = 7
"""The seed of the embedded sandbox's inventory, and of `numbersvc sandbox`'s."""
LOG_FORMATS: Final = ("text", "json")
"""The values of NUMBERSVC_LOG_FORMAT (`numbersvc.logs` renders them)."""
MAX_SECONDS: Final = 2_147_483.0
"""The most any `*_seconds` setting may be (24.8 days): gRPC's millisecond options are C ints,
and every duration reaches a timer or a timestamp that a larger one would overflow."""
# The default fallback budget is this share of the account's (see `Config.fallback_rate`).
_FALLBACK_SHARES: Final = 3


class ConfigError(ValueError):
    """A setting is missing, malformed or contradicts another one."""


class UpstreamKind(enum.StrEnum):
    """Which Plivo API the server talks to."""

    PLIVO = "plivo"
    SANDBOX = "sandbox"


class Secret:
    """A string that never shows itself in `repr`, `str` or f-strings.

    Use `reveal()` at the one place the value is needed (building the HTTP auth).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret value."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Setting:
    """How one `Config` field is set from outside: its env variable, flag and help."""

    env: str
    help: str
    metavar: str | None = None

    @property
    def flag(self) -> str:
        """The command-line flag, derived from the env name (`NUMBERSVC_LISTEN` -> `--listen`)."""
        name = self.env.removeprefix("NUMBERSVC_").lower().replace("_", "-")
        return f"--{name}"


def _s(default: Any, env: str, help: str, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"setting": Setting(env, help, metavar)})


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the server can be told. Defaults are what `make run` uses."""

    listen: str = _s("127.0.0.1:50051", "NUMBERSVC_LISTEN", "gRPC address, HOST:PORT (port 0: any)")
    upstream: UpstreamKind | None = _s(
        None,
        "NUMBERSVC_UPSTREAM",
        "plivo or sandbox; unset: Plivo when both credentials are set, else the sandbox",
        "plivo|sandbox",
    )
    plivo_auth_id: str = _s("", "PLIVO_AUTH_ID", "Plivo Auth ID (MA... or SA..., 20 characters)")
    plivo_auth_token: Secret = _s(
        Secret(""), "PLIVO_AUTH_TOKEN", "Plivo Auth Token; prefer the env: flags show in `ps`"
    )
    plivo_auth_token_file: str = _s(
        "", "PLIVO_AUTH_TOKEN_FILE", "file holding the Plivo Auth Token (a mounted Secret)"
    )
    plivo_base_url: str = _s(DEFAULT_BASE_URL, "PLIVO_BASE_URL", "Plivo API base URL")
    sandbox_seed: int = _s(
        DEFAULT_SANDBOX_SEED, "NUMBERSVC_SANDBOX_SEED", "seed of the embedded sandbox's inventory"
    )
    default_deadline_seconds: float = _s(
        10.0, "NUMBERSVC_DEFAULT_DEADLINE_SECONDS", "budget for a call that carries no deadline"
    )
    attempt_timeout_seconds: float = _s(
        5.0, "NUMBERSVC_ATTEMPT_TIMEOUT_SECONDS", "longest single upstream read attempt"
    )
    retry_max_attempts: int = _s(4, "NUMBERSVC_RETRY_MAX_ATTEMPTS", "upstream attempts per read")
    retry_initial_delay_seconds: float = _s(
        0.1, "NUMBERSVC_RETRY_INITIAL_DELAY_SECONDS", "first backoff ceiling (full jitter)"
    )
    retry_max_delay_seconds: float = _s(
        2.0, "NUMBERSVC_RETRY_MAX_DELAY_SECONDS", "largest backoff ceiling"
    )
    retry_after_ceiling_seconds: float = _s(
        5.0, "NUMBERSVC_RETRY_AFTER_CEILING_SECONDS", "most an upstream Retry-After is honoured"
    )
    rent_min_deadline_seconds: float = _s(
        2.0, "NUMBERSVC_RENT_MIN_DEADLINE_SECONDS", "refuse a rent with less deadline left"
    )
    rent_timeout_seconds: float = _s(
        30.0, "NUMBERSVC_RENT_TIMEOUT_SECONDS", "how long a sent rent may run to learn its outcome"
    )
    max_rent_quantity: int = _s(10, "NUMBERSVC_MAX_RENT_QUANTITY", "most numbers per order")
    daily_rent_cap: int = _s(
        100, "NUMBERSVC_DAILY_RENT_CAP", "most numbers one caller may rent per UTC day; 0: no cap"
    )
    ledger_path: str = _s(
        "",
        "NUMBERSVC_LEDGER_PATH",
        "order ledger (SQLite); unset: $XDG_STATE_HOME/numbersvc/ledger.sqlite3 for Plivo,"
        " ledger-sandbox.sqlite3 for the sandbox, ledger-HOST-PORT.sqlite3 for another base URL",
    )
    database_url: Secret = _s(
        Secret(""),
        "NUMBERSVC_DATABASE_URL",
        "PostgreSQL for the order ledger, a libpq URL (postgresql://user@host:port/db;"
        " password from PGPASSWORD or the _FILE); unset: the SQLite file",
    )
    database_url_file: str = _s(
        "", "NUMBERSVC_DATABASE_URL_FILE", "file holding NUMBERSVC_DATABASE_URL (a mounted Secret)"
    )
    database_pool_max: int = _s(
        4,
        "NUMBERSVC_DATABASE_POOL_MAX",
        "PostgreSQL connections per replica, at most (the database needs this x replicas)",
    )
    instance_lease_seconds: float = _s(
        15.0,
        "NUMBERSVC_INSTANCE_LEASE_SECONDS",
        "a server counts as alive this long after each ledger heartbeat (sent every third)",
    )
    upstream_rate: str = _s(
        "300/5s",
        "NUMBERSVC_UPSTREAM_RATE",
        "budget of Plivo requests, N/<time>, or off; shared by every process on the store",
    )
    upstream_rate_fallback: str = _s(
        "",
        "NUMBERSVC_UPSTREAM_RATE_FALLBACK",
        "each process's own budget while the store is unreachable, N/<time> or off (no limit);"
        " unset: a third of NUMBERSVC_UPSTREAM_RATE",
    )
    stream_read_ahead_pages: int = _s(
        16, "NUMBERSVC_STREAM_READ_AHEAD_PAGES", "pages a stream fetches ahead of its reader"
    )
    coalesce_reads: bool = _s(
        True, "NUMBERSVC_COALESCE_READS", "identical reads in flight share one upstream call"
    )
    search_cache_seconds: float = _s(
        0.0,
        "NUMBERSVC_SEARCH_CACHE_SECONDS",
        "serve identical searches and gets from memory this long (stock that old); 0: off",
    )
    search_cache_max_entries: int = _s(
        1000, "NUMBERSVC_SEARCH_CACHE_MAX_ENTRIES", "most answers the search cache keeps (LRU)"
    )
    upstream_max_connections: int = _s(
        64, "NUMBERSVC_UPSTREAM_MAX_CONNECTIONS", "upstream HTTP connection pool size"
    )
    upstream_http_stack: HttpStack = _s(
        HttpStack.AIOHTTP,
        "NUMBERSVC_UPSTREAM_HTTP_STACK",
        "HTTP implementation under httpx: aiohttp (faster here) or httpcore",
        "aiohttp|httpcore",
    )
    drain_seconds: float = _s(
        5.0, "NUMBERSVC_DRAIN_SECONDS", "on SIGTERM: NOT_SERVING this long before stopping"
    )
    shutdown_grace_seconds: float = _s(
        10.0, "NUMBERSVC_SHUTDOWN_GRACE_SECONDS", "on SIGTERM: time in-flight calls get to finish"
    )
    tls_cert: str = _s("", "NUMBERSVC_TLS_CERT", "server certificate chain (PEM); TLS when set")
    tls_key: str = _s("", "NUMBERSVC_TLS_KEY", "server private key (PEM), with NUMBERSVC_TLS_CERT")
    tls_client_ca: str = _s(
        "", "NUMBERSVC_TLS_CLIENT_CA", "CA bundle (PEM) clients must be signed by: mutual TLS"
    )
    callers_file: str = _s(
        "", CALLERS_FILE_ENV, "who may call (numbersvc callers add); unset: anyone"
    )
    trust_xfcc_from: str = _s(
        "",
        "NUMBERSVC_TRUST_XFCC_FROM",
        "CIDRs of mesh sidecars whose x-forwarded-client-cert names the caller (Istio:"
        " 127.0.0.0/8,::1/128); unset: the header is ignored",
        "CIDR,...",
    )
    reflection: bool = _s(True, "NUMBERSVC_REFLECTION", "serve gRPC reflection (numbers.read)")
    log_level: str = _s("INFO", "NUMBERSVC_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _s("text", "NUMBERSVC_LOG_FORMAT", "text, or json for one object per line")
    metrics_listen: str = _s(
        "127.0.0.1:9464", "NUMBERSVC_METRICS_LISTEN", "Prometheus /metrics address, or off"
    )
    keepalive_time_seconds: float = _s(
        60.0, "NUMBERSVC_KEEPALIVE_TIME_SECONDS", "ping an idle client connection this often"
    )
    keepalive_timeout_seconds: float = _s(
        20.0, "NUMBERSVC_KEEPALIVE_TIMEOUT_SECONDS", "drop a connection whose ping goes unanswered"
    )
    max_connection_age_seconds: float = _s(
        300.0,
        "NUMBERSVC_MAX_CONNECTION_AGE_SECONDS",
        "GOAWAY a connection this old, so L4 balancers rebalance; 0: never",
    )
    max_connection_age_grace_seconds: float = _s(
        600.0,
        "NUMBERSVC_MAX_CONNECTION_AGE_GRACE_SECONDS",
        "time calls on an aged-out connection get to finish (long streams)",
    )
    max_concurrent_rpcs: int = _s(
        1000, "NUMBERSVC_MAX_CONCURRENT_RPCS", "RPCs served at once; more get RESOURCE_EXHAUSTED"
    )
    max_health_watches: int = _s(
        16,
        "NUMBERSVC_MAX_HEALTH_WATCHES",
        "open health Watch streams (unauthenticated), on top of the RPC cap; more get"
        " RESOURCE_EXHAUSTED",
    )

    def __post_init__(self) -> None:
        _check_listen(self.listen)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_seconds") and not 0 <= value <= MAX_SECONDS:
                raise ConfigError(
                    f"{_setting(f).env} must be a finite number >= 0 and at most"
                    f" {MAX_SECONDS:.0f}, not {value:g}"
                )
        if self.instance_lease_seconds <= 0:
            raise ConfigError("NUMBERSVC_INSTANCE_LEASE_SECONDS must be positive")
        at_least_one = (
            "retry_max_attempts",
            "max_rent_quantity",
            "stream_read_ahead_pages",
            "search_cache_max_entries",
            "upstream_max_connections",
            "database_pool_max",
            "max_health_watches",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigError(f"{_setting_named(name).env} must be at least 1")
        for name, what in (("daily_rent_cap", "no cap"), ("max_concurrent_rpcs", "no limit")):
            if getattr(self, name) < 0:
                env = _setting_named(name).env
                raise ConfigError(f"{env} must be 0 ({what}) or positive")
        self._check_rates()
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("set NUMBERSVC_TLS_CERT and NUMBERSVC_TLS_KEY together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("NUMBERSVC_TLS_CLIENT_CA (mutual TLS) needs NUMBERSVC_TLS_CERT")
        base_url = urllib.parse.urlsplit(self.plivo_base_url.strip())
        if base_url.scheme.lower() not in ("http", "https") or not base_url.hostname:
            raise ConfigError(
                f"PLIVO_BASE_URL must be an http(s) URL with a host, not {self.plivo_base_url!r}"
            )
        if self.plivo_auth_token and self.plivo_auth_token_file:
            raise ConfigError("set PLIVO_AUTH_TOKEN or PLIVO_AUTH_TOKEN_FILE, not both")
        if self.database_url and self.database_url_file:
            raise ConfigError("set NUMBERSVC_DATABASE_URL or NUMBERSVC_DATABASE_URL_FILE, not both")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"NUMBERSVC_LOG_FORMAT: {self.log_format!r} is not text or json")
        if self.metrics_listen != "off":
            _check_listen(self.metrics_listen, "NUMBERSVC_METRICS_LISTEN")
        try:
            self.trusted_xfcc_networks()
        except ValueError as exc:
            raise ConfigError(f"NUMBERSVC_TRUST_XFCC_FROM: {exc}") from None
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"NUMBERSVC_LOG_LEVEL: unknown level {self.log_level!r}")

    def _check_rates(self) -> None:
        rate = self._rate("upstream_rate")
        fallback = self._rate("upstream_rate_fallback") if self.upstream_rate_fallback else None
        if rate and fallback and fallback.tokens_per_second > rate.tokens_per_second:
            raise ConfigError(
                f"NUMBERSVC_UPSTREAM_RATE_FALLBACK ({fallback}) is faster than the account's"
                f" budget NUMBERSVC_UPSTREAM_RATE ({rate}): one process alone would exceed it"
            )

    def _rate(self, name: str) -> RateSpec | None:
        from numbersvc.upstream.ratelimit import parse_rate  # here: it loads asyncio

        try:
            return parse_rate(getattr(self, name))
        except ValueError as exc:
            raise ConfigError(f"{_setting_named(name).env}: {exc}") from None

    def fallback_rate(self) -> RateSpec | None:
        """Return each process's own budget while the store is unreachable (None: no limit).

        Unset: a third of the account's budget, so three replicas on their own spend at most
        the whole of it.
        """
        if self.upstream_rate_fallback:
            return self._rate("upstream_rate_fallback")
        rate = self._rate("upstream_rate")
        return None if rate is None else rate.divided(_FALLBACK_SHARES)

    def trusted_xfcc_networks(self) -> tuple[IPNetwork, ...]:
        """Return the networks whose `x-forwarded-client-cert` is believed; none when unset.

        Raises:
            ValueError: the setting is not a list of CIDRs.
        """
        return parse_networks(self.trust_xfcc_from) if self.trust_xfcc_from else ()

    def resolved_ledger_path(self) -> str:
        """Return the ledger file: the setting, else one under XDG state per kind of upstream.

        Unset, real orders (Plivo's production API) go to `ledger.sqlite3`; the embedded
        sandbox's to `ledger-sandbox.sqlite3`; and any other base URL's (a standalone sandbox,
        a recording proxy) to `ledger-HOST-PORT.sqlite3`, so that play orders never mix with
        real ones, nor one sandbox's with another's.
        """
        if self.ledger_path:
            return self.ledger_path
        from numbersvc.ledger import default_ledger_path  # here: the ledger loads protobuf

        name = "ledger.sqlite3"
        if self.resolved_upstream() is UpstreamKind.SANDBOX:
            name = "ledger-sandbox.sqlite3"
        elif (other := _other_than_plivo(self.plivo_base_url)) is not None:
            name = f"ledger-{other}.sqlite3"
        return str(default_ledger_path().with_name(name))

    def plivo_token(self) -> Secret:
        """Return the Plivo Auth Token, from the environment or its file.

        Raises:
            ConfigError: the token file cannot be read or is empty.
        """
        return _secret(self.plivo_auth_token, self.plivo_auth_token_file, "PLIVO_AUTH_TOKEN_FILE")

    def database(self) -> Secret:
        """Return the PostgreSQL URL, from the environment or its file; empty: SQLite.

        Raises:
            ConfigError: the URL file cannot be read or is empty.
        """
        return _secret(self.database_url, self.database_url_file, "NUMBERSVC_DATABASE_URL_FILE")

    def resolved_upstream(self) -> UpstreamKind:
        """Decide the upstream from `upstream` and the credentials.

        Raises:
            ConfigError: only one credential is set, or `plivo` is asked for without both.
        """
        has_id = bool(self.plivo_auth_id)
        has_token = bool(self.plivo_auth_token) or bool(self.plivo_auth_token_file)
        if self.upstream is UpstreamKind.SANDBOX:
            return UpstreamKind.SANDBOX
        if has_id != has_token:
            missing = "PLIVO_AUTH_TOKEN" if has_id else "PLIVO_AUTH_ID"
            raise ConfigError(f"{missing} is not set: set both Plivo credentials or neither")
        if self.upstream is UpstreamKind.PLIVO and not has_id:
            raise ConfigError("NUMBERSVC_UPSTREAM=plivo needs PLIVO_AUTH_ID and PLIVO_AUTH_TOKEN")
        return UpstreamKind.PLIVO if has_id else UpstreamKind.SANDBOX

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        """Build a config from environment variables; unset or empty ones keep their default.

        Raises:
            ConfigError: a value does not parse or is out of range.
        """
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(_setting(f).env)
            if raw is not None and (raw != "" or f.name in _NEVER_BLANK):
                values[f.name] = _parse(f, raw)
        return cls(**values)

    def with_args(self, args: argparse.Namespace) -> Config:
        """Return a copy with every flag given on the command line applied over this config."""
        overrides = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(self)
            if getattr(args, f.name, None) is not None
        }
        return dataclasses.replace(self, **overrides)


def _secret(value: Secret, path: str, env: str) -> Secret:
    """`value`, or the stripped text of the file at `path` (the setting `env`) when given."""
    if not path:
        return value
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{env}: cannot read it ({exc.strerror})") from None
    if not text:
        raise ConfigError(f"{env} is empty")
    return Secret(text)


def settings() -> list[tuple[str, Setting, Any]]:
    """Every setting as (field name, declaration, default), in declaration order."""
    return [(f.name, _setting(f), f.default) for f in dataclasses.fields(Config)]


def markdown_table() -> str:
    """Render every setting as the settings table of docs/configuration.md."""
    lines = ["| env variable | flag | default | what it sets |", "|---|---|---|---|"]
    for _, s, default in settings():
        lines.append(f"| `{s.env}` | `{s.flag}` | {_show_default(default)} | {s.help} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; a flag left out keeps the environment's value."""
    for f in dataclasses.fields(Config):
        s = _setting(f)
        parser.add_argument(
            s.flag,
            dest=f.name,
            type=_parser_for(f),
            default=None,
            metavar=s.metavar,
            help=f"{s.help} (env {s.env}; default {_show_default(f.default)})",
        )


def _setting(f: dataclasses.Field[Any]) -> Setting:
    setting: Setting = f.metadata["setting"]
    return setting


def _setting_named(name: str) -> Setting:
    return next(_setting(f) for f in dataclasses.fields(Config) if f.name == name)


def _show_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, Secret):
        return "unset" if not value else "********"
    return str(value) if value != "" else "unset"


def _parser_for(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            return _parse(f, raw)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


_PARSERS: Final[dict[str, Callable[[str], Any]]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": lambda raw: _boolean(raw),
    "Secret": Secret,
    "UpstreamKind | None": UpstreamKind,
    "HttpStack": HttpStack,
}


# Settings whose empty value must not pass for "unset" either: an empty callers file setting
# would turn access control off, silently, where someone meant to turn it on.
_NEVER_BLANK: Final = frozenset({"callers_file"})


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    # NOTE: one rule for every setting: whitespace alone is a mistake (an empty template, a
    # stray quote), never "unset", which for some settings turns a protection off.
    if not raw.strip():
        env = _setting(f).env
        raise ConfigError(f"{env} is set but blank: give it a value, or unset {env}")
    kind = _PARSERS[str(f.type)]
    try:
        return kind(raw.strip() if kind is not Secret else raw)
    except ValueError:
        raise ConfigError(f"{_setting(f).env}: cannot read {_redact(f, raw)!r}") from None


def _boolean(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _redact(f: dataclasses.Field[Any], raw: str) -> str:
    return "********" if f.type == "Secret" else raw


def parse_host_port(text: str) -> tuple[str, int]:
    """Split `HOST:PORT` (an IPv6 host in brackets: `[::1]:0`) into the host and the port.

    Raises:
        ValueError: not HOST:PORT with a port in 0..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _other_than_plivo(base_url: str) -> str | None:
    """None for Plivo's production API; else `HOST-PORT` of `base_url`, safe in a file name."""
    url = urllib.parse.urlsplit(base_url.strip())
    production = urllib.parse.urlsplit(DEFAULT_BASE_URL)
    try:
        port = url.port or {"http": 80, "https": 443}.get(url.scheme.lower(), 0)
    except ValueError:
        raise ConfigError(f"PLIVO_BASE_URL: not a URL with a port: {base_url!r}") from None
    if (url.scheme.lower(), (url.hostname or "").rstrip("."), port) == (
        production.scheme,
        production.hostname,
        443,
    ):
        return None
    return re.sub(r"[^A-Za-z0-9.-]", "_", f"{url.hostname or 'unknown'}-{port}")


def _check_listen(listen: str, env: str = "NUMBERSVC_LISTEN") -> None:
    try:
        parse_host_port(listen)
    except ValueError:
        raise ConfigError(f"{env} must be HOST:PORT, not {listen!r}") from None
