"""The callers file: round trips, lookups, every load error, atomic edits, and no token leaks."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pytest

from numbersvc import callers
from numbersvc.callers import (
    PERMISSIONS,
    Caller,
    CallerEntry,
    Callers,
    CallersFileError,
    IdentityKind,
    add_caller,
    remove_caller,
)
from tests.ci import require

READ: Final = "numbers.read"
RENT: Final = "numbers.rent"
SETTLE: Final = "numbers.settle"
SPIFFE_ID: Final = "spiffe://example.org/ns/billing/sa/api"
# A token as `add_caller` makes them (token_urlsafe(32)), and its hash.
TOKEN: Final = "jeTNfoHPoX5wUxQahkyJuW3Wrotd7N-ogpw-SeFCOCU"
TOKEN_SHA256: Final = hashlib.sha256(TOKEN.encode()).hexdigest()


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document))
    return path


def entry(name: str = "billing", **identity: object) -> dict[str, object]:
    return {"name": name, "permissions": [READ], **(identity or {"token_sha256": TOKEN_SHA256})}


def doc(*entries: object) -> dict[str, object]:
    return {"version": 1, "callers": list(entries)}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "callers.json"


# --- the model --------------------------------------------------------------------------------


def test_permissions_are_read_rent_and_settle() -> None:
    assert PERMISSIONS == (READ, RENT, SETTLE)
    assert PERMISSIONS == ("numbers.read", "numbers.rent", "numbers.settle")  # the file's words


def test_caller_allows_only_its_permissions() -> None:
    reader = Caller("billing", frozenset({READ}))
    assert reader.allows(READ)
    assert not reader.allows(RENT)
    assert not reader.allows("numbers.write")


def test_the_documented_example_loads(tmp_path: Path) -> None:
    file = write(
        tmp_path / "callers.json",
        doc(
            {"name": "billing", "permissions": [READ], "token_sha256": TOKEN_SHA256},
            {"name": "mesh-svc", "permissions": [READ, RENT], "spiffe_id": SPIFFE_ID},
            {"name": "legacy", "permissions": [RENT, RENT], "common_name": "legacy.internal"},
        ),
    )
    loaded = Callers.load(file)
    assert len(loaded) == 3
    assert loaded.entries() == (
        CallerEntry(Caller("billing", frozenset({READ})), IdentityKind.TOKEN),
        CallerEntry(Caller("mesh-svc", frozenset({READ, RENT})), IdentityKind.SPIFFE_ID, SPIFFE_ID),
        CallerEntry(
            Caller("legacy", frozenset({RENT})), IdentityKind.COMMON_NAME, "legacy.internal"
        ),
    )


def test_an_empty_list_of_callers_is_valid_and_lets_nobody_in(tmp_path: Path) -> None:
    loaded = Callers.load(write(tmp_path / "c.json", doc()))
    assert len(loaded) == 0
    assert loaded.by_token(TOKEN) is None


def test_round_trip_of_every_kind_of_identity(path: Path) -> None:
    token = add_caller(path, "billing", [READ])
    assert add_caller(path, "mesh-svc", [RENT, READ], spiffe_id=SPIFFE_ID) is None
    assert add_caller(path, "legacy", [RENT], common_name="legacy.internal") is None
    assert token is not None
    loaded = Callers.load(path)
    assert [e.caller.name for e in loaded.entries()] == ["billing", "mesh-svc", "legacy"]
    assert loaded.by_token(token) == Caller("billing", frozenset({READ}))
    assert loaded.by_spiffe_id(SPIFFE_ID) == Caller("mesh-svc", frozenset({READ, RENT}))
    assert loaded.by_common_name("legacy.internal") == Caller("legacy", frozenset({RENT}))


def test_the_file_holds_version_1_and_exactly_the_documented_keys(path: Path) -> None:
    token = add_caller(path, "billing", [RENT, READ])
    add_caller(path, "mesh-svc", [READ], spiffe_id=SPIFFE_ID)
    assert token is not None
    assert json.loads(path.read_text()) == doc(
        {"name": "billing", "permissions": [READ, RENT], "token_sha256": sha256(token)},
        {"name": "mesh-svc", "permissions": [READ], "spiffe_id": SPIFFE_ID},
    )


def test_tokens_are_256_random_bits_in_url_safe_text(path: Path) -> None:
    tokens = {add_caller(path, f"c{i}", [READ]) for i in range(5)}
    assert len(tokens) == 5
    for token in tokens:
        assert token is not None
        assert len(token) == 43  # 32 bytes of base64 without padding
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_no_token_starts_with_a_dash() -> None:
    # `numbersvc call --token TOKEN` would read one as an option; one token in 64 did. In 3,000
    # draws the old way, some start with "-" with a probability of 1 - (63/64)**3000 ~ 1 - 4e-21.
    tokens = [callers._new_record(f"c{i}", [READ], None, None)[1] for i in range(3000)]
    assert all(token and len(token) == 43 and token[0] != "-" for token in tokens)


# --- lookups ----------------------------------------------------------------------------------


@pytest.fixture
def three_tokens(path: Path) -> tuple[Callers, list[str]]:
    tokens = [add_caller(path, name, [READ]) for name in ("a", "b", "c")]
    add_caller(path, "mesh", [READ], spiffe_id=SPIFFE_ID)
    return Callers.load(path), [t for t in tokens if t is not None]


def test_each_token_finds_its_own_caller(three_tokens: tuple[Callers, list[str]]) -> None:
    loaded, tokens = three_tokens
    assert [loaded.by_token(t) for t in tokens] == [
        Caller(name, frozenset({READ})) for name in ("a", "b", "c")
    ]


@pytest.mark.parametrize(
    "presented",
    ["", "wrong", TOKEN, TOKEN_SHA256, " ", "\ud800", SPIFFE_ID],
    ids=["empty", "wrong", "other", "its-hash", "space", "lone-surrogate", "spiffe-id"],
)
def test_an_unknown_or_empty_token_is_nobody(
    three_tokens: tuple[Callers, list[str]], presented: str
) -> None:
    loaded, _ = three_tokens
    assert loaded.by_token(presented) is None


def test_a_token_is_not_found_by_its_hash_with_a_hand_written_file(tmp_path: Path) -> None:
    loaded = Callers.load(write(tmp_path / "c.json", doc(entry())))
    assert loaded.by_token(TOKEN) == Caller("billing", frozenset({READ}))
    assert loaded.by_token(TOKEN_SHA256) is None
    assert loaded.by_token(TOKEN + " ") is None
    assert loaded.by_token(TOKEN[:-1]) is None


def test_a_token_with_a_near_miss_case_is_nobody(three_tokens: tuple[Callers, list[str]]) -> None:
    loaded, tokens = three_tokens
    assert loaded.by_token(tokens[0].swapcase()) is None


@pytest.mark.parametrize("hit", [True, False])
def test_every_token_entry_is_compared_in_constant_time_for_a_hit_and_a_miss(
    three_tokens: tuple[Callers, list[str]], monkeypatch: pytest.MonkeyPatch, hit: bool
) -> None:
    loaded, tokens = three_tokens
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    # The first entry matches: a loop that stopped there would make one comparison.
    found = loaded.by_token(tokens[0] if hit else "not a token")
    assert (found is not None) is hit
    assert len(calls) == len(tokens) == 3  # the SPIFFE entry is not a token entry
    assert all(len(a) == len(b) == 32 for a, b in calls)  # digests, never the token itself


def test_certificate_lookups_match_exactly(tmp_path: Path) -> None:
    loaded = Callers.load(
        write(
            tmp_path / "c.json",
            doc(
                entry("mesh", spiffe_id=SPIFFE_ID),
                entry("legacy", common_name="legacy.internal"),
            ),
        )
    )
    assert loaded.by_spiffe_id(SPIFFE_ID) == Caller("mesh", frozenset({READ}))
    assert loaded.by_common_name("legacy.internal") == Caller("legacy", frozenset({READ}))
    for other in [SPIFFE_ID + "/x", SPIFFE_ID.upper(), SPIFFE_ID + "/", "legacy.internal"]:
        assert loaded.by_spiffe_id(other) is None
    for other in ["Legacy.internal", "legacy", SPIFFE_ID, ""]:
        assert loaded.by_common_name(other) is None
    assert loaded.by_token(SPIFFE_ID) is None


# --- load errors ------------------------------------------------------------------------------

LOAD_ERRORS: Final = [
    pytest.param([entry()], "the top level is not a JSON object", id="top level a list"),
    pytest.param({"callers": []}, "version must be the number 1", id="no version"),
    pytest.param(
        {"version": "1", "callers": []}, "version must be the number 1", id="version as text"
    ),
    pytest.param(
        {"version": True, "callers": []}, "version must be the number 1", id="version true"
    ),
    pytest.param({"version": 2, "callers": []}, "version 2 is not supported", id="version 2"),
    pytest.param({**doc(), "extra": 1}, "unknown top-level key(s) 'extra'", id="unknown top key"),
    pytest.param({"version": 1}, "callers must be a list", id="no callers"),
    pytest.param({"version": 1, "callers": {}}, "callers must be a list", id="callers an object"),
    pytest.param(doc("billing"), "callers[0] is not a JSON object", id="entry not an object"),
    pytest.param(
        doc({"permissions": [READ], "token_sha256": TOKEN_SHA256}), "callers[0]: name", id="no name"
    ),
    pytest.param(doc(entry("")), "callers[0]: name must be 1 to 64", id="empty name"),
    pytest.param(doc(entry("n" * 65)), "callers[0]: name must be 1 to 64", id="name too long"),
    pytest.param(
        doc(entry("bill ing")), "callers[0]: name must be 1 to 64", id="name with a space"
    ),
    pytest.param(doc(entry("a/b")), "callers[0]: name must be", id="name with a slash"),
    pytest.param(doc(entry(7)), "callers[0]: name must be", id="name not text"),  # type: ignore[arg-type]
    pytest.param(
        doc(entry("a"), entry("a", spiffe_id=SPIFFE_ID)),
        "two callers are named 'a'",
        id="duplicate names",
    ),
    pytest.param(
        doc({**entry(), "permissions": [READ, "numbers.write"]}),
        "permissions[1] is not one of numbers.read, numbers.rent, numbers.settle",
        id="unknown permission",
    ),
    pytest.param(
        doc({**entry(), "permissions": ["NUMBERS.READ"]}),
        "permissions[0] is not one of",
        id="permission in capitals",
    ),
    pytest.param(
        doc({**entry(), "permissions": []}),
        "permissions must be a list of one or more",
        id="no permissions",
    ),
    pytest.param(
        doc({**entry(), "permissions": READ}),
        "permissions must be a list",
        id="permissions as text",
    ),
    pytest.param(
        doc({"name": "a", "token_sha256": TOKEN_SHA256}),
        "permissions must be a list",
        id="missing permissions",
    ),
    pytest.param(
        doc({"name": "a", "permissions": [READ]}),
        "callers[0] (a) needs exactly one identity (token_sha256, spiffe_id or common_name), not 0",
        id="no identity",
    ),
    pytest.param(
        doc(entry(token_sha256=TOKEN_SHA256, spiffe_id=SPIFFE_ID)),
        "needs exactly one identity (token_sha256, spiffe_id or common_name), not 2",
        id="two identities",
    ),
    pytest.param(
        doc(entry(token_sha256=TOKEN_SHA256.upper())),
        "token_sha256 must be 64 lowercase hex digits",
        id="hash in capitals",
    ),
    pytest.param(
        doc(entry(token_sha256=TOKEN_SHA256[:-1])),
        "token_sha256 must be 64 lowercase hex",
        id="hash too short",
    ),
    pytest.param(
        doc(entry(token_sha256=TOKEN_SHA256 + "0")),
        "token_sha256 must be 64 lowercase hex",
        id="hash too long",
    ),
    pytest.param(
        doc(entry(token_sha256="g" * 64)),
        "token_sha256 must be 64 lowercase hex",
        id="hash not hex",
    ),
    pytest.param(
        doc(entry(token_sha256=TOKEN_SHA256 + "\n")),
        "token_sha256 must be",
        id="hash with a newline",
    ),
    pytest.param(doc(entry(token_sha256=123)), "token_sha256 must be", id="hash a number"),
    pytest.param(
        doc(entry(spiffe_id="https://example.org/x")),
        "spiffe_id is not a SPIFFE ID",
        id="spiffe id over http",
    ),
    pytest.param(
        doc(entry(spiffe_id="spiffe://example.org")),
        "spiffe_id is not a SPIFFE ID",
        id="spiffe id without a path",
    ),
    pytest.param(
        doc(entry(spiffe_id=SPIFFE_ID + "/")),
        "is not a SPIFFE ID",
        id="spiffe id with a slash at the end",
    ),
    pytest.param(
        doc(entry(spiffe_id="spiffe://example.org/a//b")),
        "is not a SPIFFE ID",
        id="spiffe id with an empty segment",
    ),
    pytest.param(
        doc(entry(spiffe_id="spiffe://example.org/a/../b")),
        "is not a SPIFFE ID",
        id="spiffe id with a dot-dot segment",
    ),
    pytest.param(
        doc(entry(spiffe_id="spiffe://example.org/./b")),
        "is not a SPIFFE ID",
        id="spiffe id with a dot segment",
    ),
    pytest.param(
        doc(entry(spiffe_id="spiffe://Example.org/a")),
        "is not a SPIFFE ID",
        id="spiffe id with a capital trust domain",
    ),
    pytest.param(
        doc(entry(spiffe_id="SPIFFE://example.org/a")),
        "is not a SPIFFE ID",
        id="spiffe id with a capital scheme",
    ),
    pytest.param(
        doc(entry(spiffe_id="spiffe://example.org:443/a")),
        "is not a SPIFFE ID",
        id="spiffe id with a port",
    ),
    pytest.param(
        doc(entry(spiffe_id="spiffe://example.org/a?b=c")),
        "is not a SPIFFE ID",
        id="spiffe id with a query",
    ),
    pytest.param(
        doc(entry(spiffe_id="spiffe://u@example.org/a")),
        "is not a SPIFFE ID",
        id="spiffe id with a user",
    ),
    pytest.param(
        doc(entry(spiffe_id="spiffe://example.org/" + "a" * 2048)),
        "is not a SPIFFE ID",
        id="spiffe id too long",
    ),
    pytest.param(doc(entry(spiffe_id=[SPIFFE_ID])), "is not a SPIFFE ID", id="spiffe id a list"),
    pytest.param(
        doc(entry(common_name="")), "common_name must be 1 to 64 printable", id="empty common name"
    ),
    pytest.param(
        doc(entry(common_name=" api ")), "common_name must be", id="common name with spaces around"
    ),
    pytest.param(
        doc(entry(common_name="a\x00b")),
        "common_name must be",
        id="common name with a control character",
    ),
    pytest.param(
        doc(entry(common_name="c" * 65)), "common_name must be", id="common name too long"
    ),
    pytest.param(
        doc({**entry(), "comment": "x"}),
        "callers[0] (billing): unknown key(s) 'comment'",
        id="unknown entry key",
    ),
    pytest.param(
        doc({**entry(), "token": "s3cret"}), "holds a token in clear", id="a token in clear"
    ),
    pytest.param(
        doc(entry("a", spiffe_id=SPIFFE_ID), entry("b", spiffe_id=SPIFFE_ID)),
        "callers 'a' and 'b' have the same SPIFFE ID",
        id="a shared spiffe id",
    ),
    pytest.param(
        doc(entry("a", common_name="x"), entry("b", common_name="x")),
        "callers 'a' and 'b' have the same common name",
        id="a shared common name",
    ),
    pytest.param(
        doc(entry("a"), entry("b")), "callers 'a' and 'b' have the same token", id="a shared token"
    ),
]


@pytest.mark.parametrize(("document", "message"), LOAD_ERRORS)
def test_a_malformed_file_is_refused_with_a_clear_message(
    tmp_path: Path, document: object, message: str
) -> None:
    file = write(tmp_path / "c.json", document)
    with pytest.raises(CallersFileError) as refused:
        Callers.load(file)
    assert str(refused.value).startswith(f"callers file {file}: ")
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is not JSON: Expecting value (line 1, column 1)"),
        (b'{"version": 1, "callers": [', "is not JSON"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
        (b'{"version": 1, "version": 1, "callers": []}', "repeats the key(s) 'version'"),
        (
            b'{"version": 1, "callers": [{"name": "a", "name": "b", "permissions": []}]}',
            "repeats the key(s) 'name'",
        ),
        (b'{"version": 1, "callers": [1' + b"1" * 5000 + b"]}", "is not JSON that can be read"),
        (b"[" * 100_000 + b"]" * 100_000, "is not JSON that can be read"),
    ],
    ids=[
        "empty",
        "cut-short",
        "not-utf8",
        "repeated-top-key",
        "repeated-entry-key",
        "huge-int",
        "deep-nesting",
    ],
)
def test_a_file_that_is_not_json_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    file = tmp_path / "c.json"
    file.write_bytes(content)
    with pytest.raises(CallersFileError, match=r"^callers file ") as refused:
        Callers.load(file)
    assert message in str(refused.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(
        CallersFileError, match=f"^callers file {re.escape(str(missing))} does not exist$"
    ):
        Callers.load(missing)


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        CallersFileError, match=f"^callers file {re.escape(str(tmp_path))} cannot be read: "
    ):
        Callers.load(tmp_path)  # a folder: reading it fails whatever the user's rights


def test_parse_names_its_source() -> None:
    with pytest.raises(CallersFileError, match=r"^the secret: version must be"):
        Callers.parse({"callers": []}, source="the secret")
    assert len(Callers.parse(doc(entry()))) == 1


# --- no token leaks ---------------------------------------------------------------------------


def test_the_token_is_in_neither_the_file_nor_a_repr(path: Path) -> None:
    token = add_caller(path, "billing", [READ])
    add_caller(path, "mesh", [READ], spiffe_id=SPIFFE_ID)
    assert token is not None
    text = path.read_text()
    assert token not in text
    assert sha256(token) in text  # what it keeps instead
    loaded = Callers.load(path)
    for shown in [repr(loaded), str(loaded), repr(loaded.entries()), repr(loaded.by_token(token))]:
        assert token not in shown
        assert sha256(token) not in shown
    assert repr(loaded) == "Callers(['billing', 'mesh'])"


TOKEN_MISPLACED: Final[list[tuple[str, object]]] = [
    ("as the hash", doc(entry(token_sha256=TOKEN))),
    ("as a permission", doc({**entry(), "permissions": [TOKEN]})),
    ("as a name", doc(entry(TOKEN + "!"))),
    ("as a spiffe id", doc(entry(spiffe_id=TOKEN))),
    ("as a spiffe id path", doc(entry(spiffe_id=f"spiffe://example.org/{TOKEN}/"))),
    ("as a common name", doc(entry(common_name=f" {TOKEN}"))),
    ("as a key", doc({**entry(), TOKEN: 1})),
    ("as a top-level key", {**doc(), TOKEN: 1}),
    ("in clear", doc({**entry(), "token": TOKEN})),
    ("as the version", {"version": TOKEN, "callers": []}),
    ("as an entry", doc(TOKEN)),
]


@pytest.mark.parametrize(
    "document", [d for _, d in TOKEN_MISPLACED], ids=[i for i, _ in TOKEN_MISPLACED]
)
def test_no_error_quotes_a_misplaced_token(tmp_path: Path, document: object) -> None:
    with pytest.raises(CallersFileError) as refused:
        Callers.load(write(tmp_path / "c.json", document))
    assert TOKEN not in str(refused.value)
    assert TOKEN not in repr(refused.value)
    assert refused.value.__cause__ is None


def test_no_error_quotes_a_token_in_a_repeated_key(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text(f'{{"version": 1, "{TOKEN}": 1, "{TOKEN}": 2, "callers": []}}')
    with pytest.raises(CallersFileError, match="repeats the key") as refused:
        Callers.load(file)
    assert TOKEN not in str(refused.value)


def test_no_error_quotes_a_token_in_broken_json(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text(f'{{"version": 1, "callers": [{TOKEN}]}}')
    with pytest.raises(CallersFileError, match="is not JSON") as refused:
        Callers.load(file)
    assert TOKEN not in str(refused.value)


def test_a_conflict_on_add_names_the_caller_not_the_token(path: Path) -> None:
    write_dir = path.parent
    write_dir.mkdir()
    write(path, doc(entry("a"), entry("b", spiffe_id=SPIFFE_ID)))
    with pytest.raises(CallersFileError, match="caller 'b' already has that SPIFFE ID"):
        add_caller(path, "c", [READ], spiffe_id=SPIFFE_ID)


# --- writing ----------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_add_creates_the_file_and_its_folders_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "callers.json"
    add_caller(path, "billing", [READ])
    assert mode(path) == 0o600
    assert path.parent.is_dir()


def test_an_update_makes_a_too_open_file_0600(path: Path) -> None:
    add_caller(path, "billing", [READ])
    path.chmod(0o644)
    add_caller(path, "other", [READ])
    assert mode(path) == 0o600


def test_add_takes_a_str_path(path: Path) -> None:
    token = add_caller(str(path), "billing", [READ])
    assert token is not None
    assert Callers.load(str(path)).by_token(token) is not None


def test_an_update_keeps_the_other_entries_and_their_order(path: Path) -> None:
    tokens = {name: add_caller(path, name, [READ]) for name in ("a", "b", "c")}
    add_caller(path, "mesh", [READ], spiffe_id=SPIFFE_ID)
    new = add_caller(path, "b", [READ, RENT])
    loaded = Callers.load(path)
    assert [e.caller.name for e in loaded.entries()] == ["a", "b", "c", "mesh"]
    for name in ("a", "c"):
        token = tokens[name]
        assert token is not None
        assert loaded.by_token(token) == Caller(name, frozenset({READ}))
    assert new is not None
    assert loaded.by_token(new) == Caller("b", frozenset({READ, RENT}))
    assert loaded.by_spiffe_id(SPIFFE_ID) is not None


def test_updating_a_name_invalidates_its_old_token(path: Path) -> None:
    old = add_caller(path, "billing", [READ, RENT])
    new = add_caller(path, "billing", [READ])
    assert old is not None
    assert new is not None
    assert old != new
    loaded = Callers.load(path)
    assert len(loaded) == 1
    assert loaded.by_token(old) is None
    assert loaded.by_token(new) == Caller("billing", frozenset({READ}))


def test_a_certificate_identity_replaces_a_token(path: Path) -> None:
    old = add_caller(path, "billing", [READ])
    assert add_caller(path, "billing", [READ], common_name="billing.internal") is None
    assert old is not None
    loaded = Callers.load(path)
    assert loaded.by_token(old) is None
    assert loaded.by_common_name("billing.internal") == Caller("billing", frozenset({READ}))
    assert loaded.entries()[0].kind is IdentityKind.COMMON_NAME


def test_a_caller_may_keep_its_own_certificate_identity(path: Path) -> None:
    add_caller(path, "mesh", [READ], spiffe_id=SPIFFE_ID)
    add_caller(path, "mesh", [READ, RENT], spiffe_id=SPIFFE_ID)
    assert Callers.load(path).by_spiffe_id(SPIFFE_ID) == Caller("mesh", frozenset({READ, RENT}))


def test_writing_leaves_no_temporary_file(path: Path) -> None:
    add_caller(path, "a", [READ])
    add_caller(path, "a", [RENT])
    remove_caller(path, "a")
    assert [p.name for p in path.parent.iterdir()] == ["callers.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary_one(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_caller(path, "a", [READ])
    before = path.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(CallersFileError, match="cannot be written: No space left on device"):
        add_caller(path, "b", [READ])
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["callers.json"]


def test_add_never_overwrites_a_malformed_file(path: Path) -> None:
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(CallersFileError, match="is not JSON"):
        add_caller(path, "billing", [READ])
    assert path.read_text() == "{not json"


def test_add_refuses_another_callers_identity_and_changes_nothing(path: Path) -> None:
    add_caller(path, "legacy", [READ], common_name="api")
    before = path.read_bytes()
    with pytest.raises(CallersFileError, match="caller 'legacy' already has that common name"):
        add_caller(path, "other", [RENT], common_name="api")
    assert path.read_bytes() == before


def test_add_refuses_a_folder_it_cannot_make(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(CallersFileError, match="cannot use its folder"):
        add_caller(tmp_path / "file" / "callers.json", "a", [READ])


def test_an_update_by_root_keeps_the_files_owner(path: Path) -> None:
    require(os.geteuid() == 0, "only root can give a file away")
    add_caller(path, "a", [READ])
    os.chown(path, 10001, 10001)
    add_caller(path, "b", [READ])
    assert (path.stat().st_uid, path.stat().st_gid) == (10001, 10001)


def test_concurrent_edits_lose_nothing(path: Path) -> None:
    names = [f"caller-{i}" for i in range(12)]
    errors: list[BaseException] = []

    def add(name: str) -> None:
        try:
            add_caller(path, name, [READ])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(e.caller.name for e in Callers.load(path).entries()) == sorted(names)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: add_caller(p, "bad name", [READ]), "a caller name is 1 to 64"),
        (lambda p: add_caller(p, "", [READ]), "a caller name is 1 to 64"),
        (lambda p: add_caller(p, "x" * 65, [READ]), "a caller name is 1 to 64"),
        (lambda p: add_caller(p, "a", []), "permissions are one or more of"),
        (lambda p: add_caller(p, "a", ["numbers.write"]), "permissions are one or more of"),
        (
            lambda p: add_caller(p, "a", [READ], spiffe_id=SPIFFE_ID, common_name="x"),
            "not both",
        ),
        (lambda p: add_caller(p, "a", [READ], spiffe_id="spiffe://x"), "not a SPIFFE ID"),
        (lambda p: add_caller(p, "a", [READ], spiffe_id=""), "not a SPIFFE ID"),
        (lambda p: add_caller(p, "a", [READ], common_name=""), "not a common name"),
        (lambda p: add_caller(p, "a", [READ], common_name="a\nb"), "not a common name"),
    ],
)
def test_add_refuses_bad_arguments_before_touching_anything(
    path: Path, call: Callable[[Path], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(path)
    assert not path.parent.exists()


def test_remove_deletes_one_caller_and_keeps_the_rest(path: Path) -> None:
    kept = add_caller(path, "a", [READ])
    gone = add_caller(path, "b", [READ])
    add_caller(path, "mesh", [READ], spiffe_id=SPIFFE_ID)
    assert remove_caller(path, "b") is True
    assert kept is not None
    assert gone is not None
    loaded = Callers.load(path)
    assert [e.caller.name for e in loaded.entries()] == ["a", "mesh"]
    assert loaded.by_token(gone) is None
    assert loaded.by_token(kept) is not None
    assert mode(path) == 0o600


def test_remove_of_an_unknown_name_changes_nothing(path: Path) -> None:
    add_caller(path, "a", [READ])
    before = path.stat()
    assert remove_caller(path, "b") is False
    assert path.stat().st_ino == before.st_ino  # not even rewritten


def test_remove_from_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CallersFileError, match="does not exist"):
        remove_caller(tmp_path / "callers.json", "a")
    with pytest.raises(CallersFileError, match="does not exist"):
        remove_caller(tmp_path / "no" / "callers.json", "a")
    assert not (tmp_path / "callers.json").exists()
    assert not (tmp_path / "no").exists()


def test_the_public_names() -> None:
    assert sorted(callers.__all__) == sorted(
        [
            "ANONYMOUS",
            "CALLERS_FILE_ENV",
            "FILE_VERSION",
            "PERMISSIONS",
            "READ",
            "RENT",
            "SETTLE",
            "Caller",
            "CallerEntry",
            "Callers",
            "CallersFileError",
            "IdentityKind",
            "add_caller",
            "remove_caller",
        ]
    )
    assert callers.CALLERS_FILE_ENV == "NUMBERSVC_CALLERS_FILE"


# --- the server's strict mode: a file others could change grants nothing ------------------------


@pytest.mark.parametrize("loose", [0o620, 0o602, 0o666, 0o664])
def test_strict_mode_refuses_a_file_that_group_or_others_can_write(path: Path, loose: int) -> None:
    add_caller(path, "billing", [READ])
    path.chmod(loose)
    assert len(Callers.load(path)) == 1  # the command line may still read (and fix) it
    with pytest.raises(CallersFileError) as refused:
        Callers.load(path, strict_mode=True)
    message = str(refused.value)
    assert message.startswith(f"callers file {path} ")
    assert f"chmod 600 {path}" in message
    assert oct(loose)[2:] in message


@pytest.mark.parametrize("private", [0o600, 0o400, 0o640, 0o644])
def test_strict_mode_loads_a_file_only_its_owner_can_write(path: Path, private: int) -> None:
    add_caller(path, "billing", [READ])
    path.chmod(private)
    assert len(Callers.load(path, strict_mode=True)) == 1


def test_strict_mode_follows_a_link_to_the_file_itself(path: Path, tmp_path: Path) -> None:
    add_caller(path, "billing", [READ])
    link = tmp_path / "mounted.json"  # as a Kubernetes Secret volume: a link to the data
    link.symlink_to(path)
    assert len(Callers.load(link, strict_mode=True)) == 1
    path.chmod(0o666)
    with pytest.raises(CallersFileError, match="chmod 600"):
        Callers.load(link, strict_mode=True)


@pytest.mark.parametrize(
    ("owner", "euid", "refused"), [(0, 1000, False), (1000, 1000, False), (1001, 1000, True)]
)
def test_strict_mode_refuses_a_file_owned_by_another_user_than_root(
    owner: int, euid: int, refused: bool
) -> None:
    st = os.stat_result((stat.S_IFREG | 0o600, 0, 0, 1, owner, 0, 10, 0, 0, 0))
    if refused:
        with pytest.raises(CallersFileError, match=f"owned by uid {owner}.*chown"):
            callers._check_private("callers.json", st, euid)
    else:
        callers._check_private("callers.json", st, euid)
