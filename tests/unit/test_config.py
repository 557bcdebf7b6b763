from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from numbersvc.config import (
    Config,
    ConfigError,
    Secret,
    UpstreamKind,
    add_arguments,
    markdown_table,
    parse_host_port,
    settings,
)
from numbersvc.upstream.ratelimit import RateSpec
from tests.docs import DOCS, section


def test_defaults_are_what_make_run_uses() -> None:
    config = Config()
    assert config.listen == "127.0.0.1:50051"
    assert config.resolved_upstream() is UpstreamKind.SANDBOX
    assert config.default_deadline_seconds == 10.0
    assert config.max_rent_quantity == 10
    assert config.stream_read_ahead_pages == 16
    assert config.search_cache_seconds == 0  # off, as before the cache existed


def test_from_env_reads_every_kind_of_setting() -> None:
    config = Config.from_env(
        {
            "NUMBERSVC_LISTEN": "0.0.0.0:9000",
            "NUMBERSVC_UPSTREAM": "plivo",
            "PLIVO_AUTH_ID": "MA" + "A" * 18,
            "PLIVO_AUTH_TOKEN": " secret with spaces ",
            "NUMBERSVC_MAX_RENT_QUANTITY": "3",
            "NUMBERSVC_DRAIN_SECONDS": "0.5",
            "UNRELATED": "x",
        }
    )
    assert config.listen == "0.0.0.0:9000"
    assert config.upstream is UpstreamKind.PLIVO
    assert config.plivo_auth_token.reveal() == " secret with spaces "
    assert (config.max_rent_quantity, config.drain_seconds) == (3, 0.5)
    assert config.resolved_upstream() is UpstreamKind.PLIVO


def test_empty_env_values_keep_defaults() -> None:
    assert Config.from_env({"NUMBERSVC_LISTEN": "", "PLIVO_AUTH_ID": ""}) == Config()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NUMBERSVC_MAX_RENT_QUANTITY": "many"}, "cannot read"),
        ({"NUMBERSVC_MAX_RENT_QUANTITY": "0"}, "at least 1"),
        ({"NUMBERSVC_DRAIN_SECONDS": "-1"}, ">= 0"),
        ({"NUMBERSVC_DRAIN_SECONDS": "nan"}, ">= 0"),
        ({"NUMBERSVC_LISTEN": "localhost"}, "HOST:PORT"),
        ({"NUMBERSVC_LISTEN": "localhost:99999"}, "HOST:PORT"),
        ({"NUMBERSVC_UPSTREAM": "twilio"}, "cannot read"),
        ({"NUMBERSVC_LOG_LEVEL": "chatty"}, "unknown level"),
        (
            {"NUMBERSVC_UPSTREAM_MAX_CONNECTIONS": "0"},
            "UPSTREAM_MAX_CONNECTIONS must be at least 1",
        ),
        ({"NUMBERSVC_DAILY_RENT_CAP": "-1"}, "DAILY_RENT_CAP must be 0 \\(no cap\\) or positive"),
        ({"NUMBERSVC_MAX_CONCURRENT_RPCS": "-1"}, "RPCS must be 0 \\(no limit\\) or positive"),
        ({"NUMBERSVC_MAX_HEALTH_WATCHES": "0"}, "MAX_HEALTH_WATCHES must be at least 1"),
        ({"NUMBERSVC_SEARCH_CACHE_MAX_ENTRIES": "0"}, "CACHE_MAX_ENTRIES must be at least 1"),
        ({"NUMBERSVC_SEARCH_CACHE_SECONDS": "-2"}, "CACHE_SECONDS must be a finite number >= 0"),
        ({"NUMBERSVC_UPSTREAM_HTTP_STACK": "curl"}, "cannot read"),
        ({"NUMBERSVC_LOG_FORMAT": "xml"}, "is not text or json"),
        ({"NUMBERSVC_UPSTREAM_RATE": "fast"}, "NUMBERSVC_UPSTREAM_RATE: invalid rate 'fast'"),
        ({"NUMBERSVC_UPSTREAM_RATE_FALLBACK": "0/5s"}, "RATE_FALLBACK: invalid rate"),
        (
            {"NUMBERSVC_UPSTREAM_RATE": "300/5s", "NUMBERSVC_UPSTREAM_RATE_FALLBACK": "61/1s"},
            "RATE_FALLBACK \\(61/1s\\) is faster than the account's budget",
        ),
        ({"NUMBERSVC_DATABASE_POOL_MAX": "0"}, "DATABASE_POOL_MAX must be at least 1"),
        (
            {"NUMBERSVC_DATABASE_URL": "postgresql://db", "NUMBERSVC_DATABASE_URL_FILE": "f"},
            "NUMBERSVC_DATABASE_URL or NUMBERSVC_DATABASE_URL_FILE, not both",
        ),
        ({"NUMBERSVC_TRUST_XFCC_FROM": "127.0.0.1/8"}, "TRUST_XFCC_FROM: .* has host bits set"),
        ({"NUMBERSVC_TRUST_XFCC_FROM": "localhost"}, "TRUST_XFCC_FROM: .* does not appear"),
        ({"NUMBERSVC_TRUST_XFCC_FROM": "127.0.0.0/8,"}, "TRUST_XFCC_FROM: an empty entry"),
        ({"NUMBERSVC_TRUST_XFCC_FROM": "10.0.0.0/33"}, "TRUST_XFCC_FROM: "),
        ({"NUMBERSVC_INSTANCE_LEASE_SECONDS": "0"}, "LEASE_SECONDS must be positive"),
        ({"NUMBERSVC_INSTANCE_LEASE_SECONDS": "-2"}, "LEASE_SECONDS must be a finite"),
    ],
)
def test_bad_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)


_DURATIONS = [s.env for name, s, _ in settings() if name.endswith("_seconds")]


@pytest.mark.parametrize("env", _DURATIONS)
@pytest.mark.parametrize("raw", ["1e300", "inf", "2147484"])
def test_every_duration_is_bounded(env: str, raw: str) -> None:
    # One rule for every `*_seconds`: 1e300 once crashed `serve` with an OverflowError.
    with pytest.raises(
        ConfigError, match=f"{env} must be a finite number >= 0 and at most 2147483,"
    ):
        Config.from_env({env: raw})


@pytest.mark.parametrize("env", _DURATIONS)
def test_every_duration_takes_its_bound(env: str) -> None:
    assert Config.from_env({env: "2147483"})


@pytest.mark.parametrize(
    ("env", "fallback"),
    [
        ({}, RateSpec(100, 5.0)),  # a third of 300/5s: three replicas alone spend it all
        ({"NUMBERSVC_UPSTREAM_RATE": "10/1s"}, RateSpec(3, 1.0)),
        ({"NUMBERSVC_UPSTREAM_RATE": "2/1s"}, RateSpec(2, 3.0)),
        ({"NUMBERSVC_UPSTREAM_RATE_FALLBACK": "60/5s"}, RateSpec(60, 5.0)),
        ({"NUMBERSVC_UPSTREAM_RATE_FALLBACK": "off"}, None),
        ({"NUMBERSVC_UPSTREAM_RATE": "off"}, None),
    ],
)
def test_fallback_rate(env: dict[str, str], fallback: RateSpec | None) -> None:
    assert Config.from_env(env).fallback_rate() == fallback


@pytest.mark.parametrize(
    ("upstream", "auth_id", "token", "expected"),
    [
        (None, "", "", UpstreamKind.SANDBOX),
        (None, "MAX", "t", UpstreamKind.PLIVO),
        (UpstreamKind.SANDBOX, "MAX", "t", UpstreamKind.SANDBOX),
        (UpstreamKind.PLIVO, "MAX", "t", UpstreamKind.PLIVO),
    ],
)
def test_upstream_resolution(
    upstream: UpstreamKind | None, auth_id: str, token: str, expected: UpstreamKind
) -> None:
    config = Config(upstream=upstream, plivo_auth_id=auth_id, plivo_auth_token=Secret(token))
    assert config.resolved_upstream() is expected


@pytest.mark.parametrize(
    ("upstream", "auth_id", "token", "message"),
    [
        (None, "MAX", "", "PLIVO_AUTH_TOKEN is not set"),
        (None, "", "t", "PLIVO_AUTH_ID is not set"),
        (UpstreamKind.PLIVO, "", "", "needs PLIVO_AUTH_ID"),
    ],
)
def test_contradictory_upstream(
    upstream: UpstreamKind | None, auth_id: str, token: str, message: str
) -> None:
    config = Config(upstream=upstream, plivo_auth_id=auth_id, plivo_auth_token=Secret(token))
    with pytest.raises(ConfigError, match=message):
        config.resolved_upstream()


def test_flags_override_env_and_unset_flags_do_not() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--listen", "127.0.0.1:0", "--max-rent-quantity", "2"])
    config = Config.from_env({"NUMBERSVC_MAX_RENT_QUANTITY": "5", "NUMBERSVC_DRAIN_SECONDS": "1"})
    merged = config.with_args(args)
    assert (merged.listen, merged.max_rent_quantity, merged.drain_seconds) == (
        "127.0.0.1:0",
        2,
        1.0,
    )


def test_bad_flag_is_a_usage_error() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--drain-seconds", "soon"])


def test_every_field_has_one_env_variable_and_flag() -> None:
    envs = [s.env for _, s, _ in settings()]
    assert len(envs) == len(set(envs)) == len(dataclasses.fields(Config))
    assert all(s.flag.startswith("--") for _, s, _ in settings())


def test_database_url_from_the_env_or_its_file_never_in_repr(tmp_path: Path) -> None:
    url = "postgresql://svc:hunter2@db:5432/ledger"
    assert not Config().database()
    config = Config.from_env({"NUMBERSVC_DATABASE_URL": url})
    assert config.database().reveal() == url
    assert "hunter2" not in repr(config)
    secret = tmp_path / "url"
    secret.write_text(url + "\n")
    from_file = Config.from_env({"NUMBERSVC_DATABASE_URL_FILE": str(secret)})
    assert from_file.database().reveal() == url
    secret.write_text(" \n")
    with pytest.raises(ConfigError, match="NUMBERSVC_DATABASE_URL_FILE is empty"):
        from_file.database()
    with pytest.raises(ConfigError, match="NUMBERSVC_DATABASE_URL_FILE: cannot read it"):
        Config(database_url_file=str(tmp_path / "missing")).database()


def test_token_never_in_repr() -> None:
    config = Config(plivo_auth_id="MAX", plivo_auth_token=Secret("hunter2"))
    assert "hunter2" not in repr(config)
    assert "hunter2" not in str(config.plivo_auth_token)
    assert f"{config.plivo_auth_token}" == "Secret('********')"


def test_documented_settings_table_is_generated() -> None:
    assert markdown_table() in section(DOCS / "configuration.md", "Settings")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:50051", ("::1", 50051)),  # the brackets are the address syntax, not the host
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_host_port(text: str, parsed: tuple[str, int]) -> None:
    assert parse_host_port(text) == parsed


@pytest.mark.parametrize("text", ["localhost", "host:", ":80", "host:65536", "host:٣", "host:-1"])
def test_parse_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_host_port(text)


_CREDENTIALS = {"plivo_auth_id": "MAXXXXXXXXXXXXXXXXXX", "plivo_auth_token": Secret("t")}


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({}, "ledger-sandbox.sqlite3"),
        (_CREDENTIALS, "ledger.sqlite3"),
        ({**_CREDENTIALS, "plivo_base_url": "https://api.plivo.com:443/"}, "ledger.sqlite3"),
        # A standalone sandbox, as the README shows it: never the real orders' file.
        (
            {**_CREDENTIALS, "plivo_base_url": "http://127.0.0.1:8089"},
            "ledger-127.0.0.1-8089.sqlite3",
        ),
        ({**_CREDENTIALS, "plivo_base_url": "http://[::1]:8089"}, "ledger-__1-8089.sqlite3"),
        (
            {**_CREDENTIALS, "plivo_base_url": "https://egress.internal"},
            "ledger-egress.internal-443.sqlite3",
        ),
        (
            {**_CREDENTIALS, "plivo_base_url": "http://api.plivo.com"},
            "ledger-api.plivo.com-80.sqlite3",
        ),
    ],
)
def test_default_ledger_is_per_upstream(
    overrides: dict[str, object], name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    path = Config(**overrides).resolved_ledger_path()  # type: ignore[arg-type]
    assert path == str(tmp_path / "numbersvc" / name)


def test_the_ledger_setting_wins_over_the_upstream() -> None:
    config = Config(**_CREDENTIALS, plivo_base_url="http://127.0.0.1:8089", ledger_path="/l.db")  # type: ignore[arg-type]
    assert config.resolved_ledger_path() == "/l.db"


@pytest.mark.parametrize("env", [s.env for _, s, _ in settings()])
def test_a_setting_of_whitespace_only_is_an_error_not_unset(env: str) -> None:
    # One rule: `NUMBERSVC_DATABASE_URL=" "` silently gave each replica its own SQLite ledger,
    # `NUMBERSVC_TLS_CLIENT_CA=" "` silently turned mutual TLS off. Empty ("") stays unset.
    with pytest.raises(ConfigError, match=f"{env} is set but blank"):
        Config.from_env({env: " \t"})


@pytest.mark.parametrize("blank", ["", " ", "\t\n"])
def test_a_blank_callers_file_is_an_error_not_access_control_off(
    blank: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="NUMBERSVC_CALLERS_FILE is set but blank"):
        Config.from_env({"NUMBERSVC_CALLERS_FILE": blank})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--callers-file", blank])
    assert exit_.value.code == 2
    assert "NUMBERSVC_CALLERS_FILE is set but blank" in capsys.readouterr().err
    assert Config.from_env({}).callers_file == ""  # unset: no callers file, as before
