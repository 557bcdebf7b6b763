"""Who may call numbersvc: the callers file, and finding a caller by token or certificate.

`NUMBERSVC_CALLERS_FILE` names a JSON file of callers. Once it is set, every call but health
needs an identity the file knows (`numbersvc.gatekeeper` asks the lookups here): a bearer
token, or a client certificate's SPIFFE ID (URI SAN) or common name. Each caller has a name
(for logs, metrics and the order ledger) and permissions:

- `numbers.read`: list, stream and get number groups, and read rental orders;
- `numbers.rent`: rent numbers, which spends money;
- `numbers.settle`: record the outcome of an order whose outcome is unknown (operators).

The file, version 1 (`numbersvc callers add` writes it; a person may edit it too)::

    {"version": 1, "callers": [
      {"name": "billing", "permissions": ["numbers.read"], "token_sha256": "<64 hex digits>"},
      {"name": "mesh-svc", "permissions": ["numbers.read", "numbers.rent"],
       "spiffe_id": "spiffe://example.org/ns/x/sa/y"},
      {"name": "legacy", "permissions": ["numbers.read"], "common_name": "legacy.internal"}]}

Every entry has exactly one identity. Names are 1 to 64 of `A-Z a-z 0-9 . _ -`, unique, as are
identities. A token is never stored, only its SHA-256 in lowercase hex: tokens are 256 random
bits, so a fast hash is enough (a slow password hash only helps against guessable secrets).
Tokens appear in no message, no repr and no log line here; neither do their hashes.

This module knows no gRPC. `add_caller` and `remove_caller` replace the file atomically, mode
0600; the server reads it when it starts, in strict mode: like sshd's `StrictModes`, it refuses
a file that group or others can write, or that belongs to neither root nor the server's user,
since whoever can change the file can grant themselves any permission.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NoReturn

__all__ = [
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

CALLERS_FILE_ENV: Final = "NUMBERSVC_CALLERS_FILE"
READ: Final = "numbers.read"
RENT: Final = "numbers.rent"
SETTLE: Final = "numbers.settle"
PERMISSIONS: Final = (READ, RENT, SETTLE)
FILE_VERSION: Final = 1
"""The version of the callers file this module reads and writes."""

_NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
# SPIFFE ID spec: lowercase trust domain; a path of segments of [A-Za-z0-9._-]. A bare trust
# domain names no workload, so a caller's id needs a path.
_SPIFFE_ID: Final = re.compile(r"spiffe://[a-z0-9._-]+(?:/[A-Za-z0-9._-]+)+")
_SPIFFE_ID_MAX_BYTES: Final = 2048  # the SPIFFE ID spec's limit for a URI SAN
_COMMON_NAME_MAX_CHARS: Final = 64  # X.509's ub-common-name
_TOKEN_BYTES: Final = 32  # 256 bits
_FILE_MODE: Final = 0o600
_FOLDER_MODE: Final = 0o700
# A key that looks like this is quoted in messages; anything else (a pasted token, say) is not.
_SAFE_KEY: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,23}")


class CallersFileError(Exception):
    """The callers file is missing, unreadable or malformed, or cannot be changed as asked.

    The message names the file and the entry at fault. It never holds token material: values
    that could be a token (a misplaced one, say) are described, never quoted.
    """


class IdentityKind(enum.StrEnum):
    """How a caller proves who it is; the value is the entry's key in the file."""

    TOKEN = "token_sha256"
    SPIFFE_ID = "spiffe_id"
    COMMON_NAME = "common_name"


@dataclass(frozen=True, slots=True)
class Caller:
    """Someone allowed to call: a name for the records and what they may do."""

    name: str
    permissions: frozenset[str]

    def allows(self, permission: str) -> bool:
        """Whether this caller holds `permission` (one of `PERMISSIONS`)."""
        return permission in self.permissions


ANONYMOUS: Final = Caller(name="anonymous", permissions=frozenset(PERMISSIONS))
"""Who calls when the server has no callers file: anyone, with every permission."""


@dataclass(frozen=True, slots=True)
class CallerEntry:
    """One entry of the callers file as it may be shown: never a token or its hash.

    Attributes:
        caller: the name and permissions.
        kind: how the caller proves who it is.
        subject: the SPIFFE ID or common name; empty for a token.
    """

    caller: Caller
    kind: IdentityKind
    subject: str = ""


@dataclass(frozen=True, slots=True)
class _Record:
    entry: CallerEntry
    token_sha256: bytes = field(default=b"", repr=False)  # the digest, for token entries

    def document(self) -> dict[str, object]:
        """Return the entry as the file holds it, permissions in `PERMISSIONS` order."""
        caller = self.entry.caller
        value = self.token_sha256.hex() if self.token_sha256 else self.entry.subject
        return {
            "name": caller.name,
            "permissions": [p for p in PERMISSIONS if p in caller.permissions],
            str(self.entry.kind): value,
        }


class _Invalid(Exception):
    """A fault in the file's content; `Callers.parse` adds which file."""


class Callers:
    """An immutable registry of callers, looked up by what a call presents.

    Build one with `Callers.load` (a file) or `Callers.parse` (a decoded document).
    """

    __slots__ = ("_by_common_name", "_by_spiffe_id", "_records", "_tokens")

    def __init__(self, records: Iterable[_Record] = ()) -> None:
        self._records = tuple(records)
        self._tokens = tuple(
            (r.token_sha256, r.entry.caller) for r in self._records if r.token_sha256
        )
        self._by_spiffe_id = self._index(IdentityKind.SPIFFE_ID)
        self._by_common_name = self._index(IdentityKind.COMMON_NAME)

    def _index(self, kind: IdentityKind) -> dict[str, Caller]:
        return {r.entry.subject: r.entry.caller for r in self._records if r.entry.kind is kind}

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, strict_mode: bool = False) -> Callers:
        """Read and check the callers file at `path`.

        Args:
            path: the callers file (a link is followed: the file it names is checked).
            strict_mode: refuse a file that someone other than its owner could change, or
                whose owner is neither root nor this process's user (the server's check).

        Raises:
            CallersFileError: the file is missing, unreadable, not UTF-8 JSON, or breaks a
                rule of the format (see the module docstring); in strict mode, too open.
        """
        source = f"callers file {os.fspath(path)}"
        try:
            with Path(path).open("rb") as file:
                if strict_mode:  # the file read, not whatever the path names a moment later
                    _check_private(path, os.fstat(file.fileno()), os.geteuid())
                data = file.read()
        except FileNotFoundError:
            raise CallersFileError(f"{source} does not exist") from None
        except OSError as exc:
            raise CallersFileError(f"{source} cannot be read: {exc.strerror or exc}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CallersFileError(f"{source} is not UTF-8 text") from None
        try:
            document = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            # NOTE: only the position: the exception's own text may one day quote the document.
            raise CallersFileError(
                f"{source} is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
        except _Invalid as exc:
            raise CallersFileError(f"{source}: {exc}") from None
        except (ValueError, RecursionError):  # an integer of too many digits; deep nesting
            raise CallersFileError(f"{source} is not JSON that can be read") from None
        return cls.parse(document, source=source)

    @classmethod
    def parse(cls, document: object, *, source: str = "callers file") -> Callers:
        """Check a decoded callers document and build the registry.

        Args:
            document: what `json.loads` made of the file.
            source: how messages name the document.

        Raises:
            CallersFileError: the document breaks a rule of the format.
        """
        try:
            return cls(_parse_document(document))
        except _Invalid as exc:
            raise CallersFileError(f"{source}: {exc}") from None

    def by_token(self, token: str) -> Caller | None:
        """Return the caller whose token this is, or None (an empty token is nobody's).

        The token's SHA-256 is compared with every token entry's, each in constant time and
        without stopping at a match, so the time taken tells neither whether one matched nor
        which.
        """
        if not token:
            return None
        # surrogatepass: a lone surrogate cannot be anyone's token, but must not raise either.
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: Caller | None = None
        for stored, caller in self._tokens:
            # NOTE: no `break` and no short-circuit before the comparison: every entry costs
            # one compare_digest. The file has no two equal digests, so at most one matches.
            if hmac.compare_digest(presented, stored):
                found = caller
        return found

    def by_spiffe_id(self, uri: str) -> Caller | None:
        """Return the caller with this SPIFFE ID (a client certificate's URI SAN), or None."""
        return self._by_spiffe_id.get(uri)

    def by_common_name(self, cn: str) -> Caller | None:
        """Return the caller with this certificate common name, or None."""
        return self._by_common_name.get(cn)

    def entries(self) -> tuple[CallerEntry, ...]:
        """Every entry in file order, without tokens or their hashes (for listing)."""
        return tuple(r.entry for r in self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:  # names only: the hashes stay out of logs
        return f"Callers({[r.entry.caller.name for r in self._records]!r})"


def add_caller(
    path: str | os.PathLike[str],
    name: str,
    permissions: Iterable[str],
    *,
    spiffe_id: str | None = None,
    common_name: str | None = None,
) -> str | None:
    """Add a caller to the callers file, or replace the identity and permissions of one.

    Without `spiffe_id` or `common_name` the caller gets a new random token, and any token it
    had stops working. The file and its folder are created if missing; the file is replaced
    atomically (a temporary file in the same folder, fsync, rename), mode 0600, and other
    entries are kept as they were.

    Args:
        path: the callers file.
        name: the caller's name, 1 to 64 of `A-Z a-z 0-9 . _ -`.
        permissions: at least one of `PERMISSIONS`.
        spiffe_id: identify the caller by this SPIFFE ID (`spiffe://trust-domain/path`).
        common_name: identify the caller by this client certificate common name.

    Returns:
        The new token (show it once: only its SHA-256 is kept), or None for a certificate
        identity.

    Raises:
        ValueError: a bad name, permission, SPIFFE ID or common name, or both identities.
        CallersFileError: the existing file is malformed, another caller has that identity,
            or the file cannot be written.
    """
    record, token = _new_record(name, permissions, spiffe_id, common_name)
    target = Path(path)
    with _editing(target) as current:
        records = list(current._records) if current is not None else []
        entry = record.entry
        for other in records:
            if other.entry.caller.name != name and _same_identity(other, record):
                raise CallersFileError(
                    f"callers file {target}: caller {other.entry.caller.name!r} already has"
                    f" that {_describe(entry.kind)}"
                )
        names = [r.entry.caller.name for r in records]
        if name in names:
            records[names.index(name)] = record
        else:
            records.append(record)
        _write(target, records)
    return token


def remove_caller(path: str | os.PathLike[str], name: str) -> bool:
    """Remove the caller `name` from the callers file (replaced atomically, as `add_caller`).

    Returns:
        Whether there was such a caller (the file is left untouched when not).

    Raises:
        CallersFileError: the file is missing or malformed, or cannot be written.
    """
    target = Path(path)
    with _editing(target, create=False) as current:
        assert current is not None  # create=False: a missing file raised
        kept = [r for r in current._records if r.entry.caller.name != name]
        if len(kept) == len(current):
            return False
        _write(target, kept)
    return True


def _new_record(
    name: str, permissions: Iterable[str], spiffe_id: str | None, common_name: str | None
) -> tuple[_Record, str | None]:
    if not _NAME.fullmatch(name):
        raise ValueError(f"a caller name is 1 to 64 of A-Z a-z 0-9 . _ -, not {name!r}")
    granted = frozenset(permissions)
    if not granted or not granted <= set(PERMISSIONS):
        raise ValueError(f"permissions are one or more of {', '.join(PERMISSIONS)}")
    caller = Caller(name, granted)
    if spiffe_id is not None and common_name is not None:
        raise ValueError("give a SPIFFE ID or a common name, not both")
    if spiffe_id is not None:
        if not _is_spiffe_id(spiffe_id):
            raise ValueError(f"not a SPIFFE ID: {spiffe_id!r} ({_SPIFFE_ID_RULE})")
        return _Record(CallerEntry(caller, IdentityKind.SPIFFE_ID, spiffe_id)), None
    if common_name is not None:
        if not _is_common_name(common_name):
            raise ValueError(f"not a common name: {common_name!r} ({_COMMON_NAME_RULE})")
        return _Record(CallerEntry(caller, IdentityKind.COMMON_NAME, common_name)), None
    token = _new_token()
    digest = hashlib.sha256(token.encode()).digest()
    return _Record(CallerEntry(caller, IdentityKind.TOKEN), digest), token


def _new_token() -> str:
    # One token in 64 would start with "-", which `--token TOKEN` on the command line reads as
    # an option (argparse: "expected one argument"); drawing again costs a few bits at most.
    while (token := secrets.token_urlsafe(_TOKEN_BYTES)).startswith("-"):
        pass
    return token


def _same_identity(a: _Record, b: _Record) -> bool:
    if a.entry.kind is not b.entry.kind:
        return False
    if a.entry.kind is IdentityKind.TOKEN:  # only by a copied hash: tokens are random
        return hmac.compare_digest(a.token_sha256, b.token_sha256)
    return a.entry.subject == b.entry.subject


# --- reading ----------------------------------------------------------------------------------

_SPIFFE_ID_RULE: Final = (
    "spiffe://trust-domain/path: a lowercase trust domain of a-z 0-9 . _ -, then path"
    " segments of A-Z a-z 0-9 . _ -, none empty, . or .."
)
_COMMON_NAME_RULE: Final = (
    f"1 to {_COMMON_NAME_MAX_CHARS} printable characters, no space at either end"
)


def _check_private(path: str | os.PathLike[str], st: os.stat_result, euid: int) -> None:
    """Refuse a callers file that group or others can write, or that another user owns.

    NOTE: unlike sshd, the folder is not checked. A file someone else puts there is theirs
    (refused by owner); a link is judged by its target; the file is read once, at start, through
    the descriptor checked here. And Kubernetes mounts ConfigMaps and Secrets (read-only) in
    folders of mode 0777 or 1777, which a folder check would refuse.
    """
    where = os.fspath(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(
            name
            for bit, name in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others"))
            if mode & bit
        )
        raise CallersFileError(
            f"callers file {where} can be written by {who} (mode {mode:03o}), who could grant"
            f" themselves any permission: `chmod 600 {where}`"
        )
    if st.st_uid not in (0, euid):
        raise CallersFileError(
            f"callers file {where} is owned by uid {st.st_uid}, neither root nor this user"
            f" (uid {euid}), who could grant themselves any permission: `chown {euid} {where}`"
        )


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # NOTE: plain json keeps the last of two equal keys; in a file that grants access, a
    # second "permissions" or identity must be an error rather than a silent winner.
    document = dict(pairs)
    if len(document) != len(pairs):
        repeated = sorted({key for key, _ in pairs if sum(k == key for k, _ in pairs) > 1})
        raise _Invalid(f"an object repeats the key(s) {_keys(repeated)}")
    return document


def _keys(keys: Iterable[str]) -> str:
    """Name keys for a message; one that is not a plain identifier could be anything."""
    return ", ".join(repr(k) if _SAFE_KEY.fullmatch(k) else "(an unusual key)" for k in keys)


def _fail(message: str) -> NoReturn:
    raise _Invalid(message)


def _parse_document(document: object) -> list[_Record]:
    if not isinstance(document, dict):
        _fail("the top level is not a JSON object")
    if unknown := sorted(set(document) - {"version", "callers"}):
        _fail(f"unknown top-level key(s) {_keys(unknown)}: version 1 has version and callers")
    version = document.get("version")
    if type(version) is not int:
        _fail(f"version must be the number {FILE_VERSION}")
    if version != FILE_VERSION:
        _fail(f"version {version} is not supported: this numbersvc reads version {FILE_VERSION}")
    entries = document.get("callers")
    if not isinstance(entries, list):
        _fail("callers must be a list of callers")
    records = [_parse_entry(entry, index) for index, entry in enumerate(entries)]
    _check_unique(records)
    return records


def _parse_entry(raw: object, index: int) -> _Record:
    where = f"callers[{index}]"
    if not isinstance(raw, dict):
        _fail(f"{where} is not a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        _fail(f"{where}: name must be 1 to 64 of A-Z a-z 0-9 . _ -")
    where = f"{where} ({name})"
    if "token" in raw:
        _fail(
            f"{where} holds a token in clear: the file keeps only its SHA-256 (token_sha256);"
            " use `numbersvc callers add` to make a new token, and treat this one as leaked"
        )
    if unknown := sorted(set(raw) - {"name", "permissions", *IdentityKind}):
        _fail(f"{where}: unknown key(s) {_keys(unknown)}")
    caller = Caller(name, _parse_permissions(raw.get("permissions"), where))
    kinds = [kind for kind in IdentityKind if kind in raw]
    if len(kinds) != 1:
        _fail(
            f"{where} needs exactly one identity (token_sha256, spiffe_id or common_name),"
            f" not {len(kinds)}"
        )
    kind = kinds[0]
    value = raw[kind]
    if kind is IdentityKind.TOKEN:
        if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
            _fail(
                f"{where}: token_sha256 must be 64 lowercase hex digits, the SHA-256 of the"
                " token (never the token itself)"
            )
        return _Record(CallerEntry(caller, kind), bytes.fromhex(value))
    if kind is IdentityKind.SPIFFE_ID:
        if not isinstance(value, str) or not _is_spiffe_id(value):
            _fail(f"{where}: spiffe_id is not a SPIFFE ID ({_SPIFFE_ID_RULE})")
    elif not isinstance(value, str) or not _is_common_name(value):
        _fail(f"{where}: common_name must be {_COMMON_NAME_RULE}")
    return _Record(CallerEntry(caller, kind, value))


def _parse_permissions(raw: object, where: str) -> frozenset[str]:
    known = ", ".join(PERMISSIONS)
    if not isinstance(raw, list) or not raw:
        _fail(f"{where}: permissions must be a list of one or more of {known}")
    for index, permission in enumerate(raw):
        # NOTE: the value is not quoted: a misplaced token must not end up in a message.
        if not isinstance(permission, str) or permission not in PERMISSIONS:
            _fail(f"{where}: permissions[{index}] is not one of {known}")
    return frozenset(raw)


def _check_unique(records: list[_Record]) -> None:
    seen_names: set[str] = set()
    seen: dict[tuple[IdentityKind, str | bytes], str] = {}
    for record in records:
        entry = record.entry
        name = entry.caller.name
        if name in seen_names:
            _fail(f"two callers are named {name!r}")
        seen_names.add(name)
        key = (entry.kind, record.token_sha256 or entry.subject)
        if (other := seen.setdefault(key, name)) != name:
            _fail(f"callers {other!r} and {name!r} have the same {_describe(entry.kind)}")


def _describe(kind: IdentityKind) -> str:
    return {
        IdentityKind.TOKEN: "token",
        IdentityKind.SPIFFE_ID: "SPIFFE ID",
        IdentityKind.COMMON_NAME: "common name",
    }[kind]


def _is_spiffe_id(value: str) -> bool:
    if len(value.encode()) > _SPIFFE_ID_MAX_BYTES or not _SPIFFE_ID.fullmatch(value):
        return False
    path = value[len("spiffe://") :].split("/")[1:]
    return not any(segment in (".", "..") for segment in path)


def _is_common_name(value: str) -> bool:
    return (
        0 < len(value) <= _COMMON_NAME_MAX_CHARS and value.isprintable() and value == value.strip()
    )


# --- writing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _editing(path: Path, *, create: bool = True) -> Iterator[Callers | None]:
    """Hold the folder's lock while the file is read, changed and replaced.

    Yields the callers in the file, or None when it does not exist and `create` is set.
    """
    try:
        if create:
            path.parent.mkdir(mode=_FOLDER_MODE, parents=True, exist_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)
    except FileNotFoundError:
        raise CallersFileError(f"callers file {path} does not exist") from None
    except OSError as exc:
        raise CallersFileError(
            f"callers file {path}: cannot use its folder: {exc.strerror or exc}"
        ) from None
    try:
        # NOTE: the lock is on the folder, not the file: every change replaces the file, so a
        # lock on it would guard a file already gone. Without it, two edits at once could
        # lose one, and a removed caller could come back.
        with contextlib.suppress(OSError):  # a filesystem without locks still gets atomicity
            fcntl.flock(folder, fcntl.LOCK_EX)
        try:
            current: Callers | None = Callers.load(path)
        except CallersFileError:
            # Only a file that is not there at all is made anew: a broken one (or a dangling
            # link) stays an error rather than being silently replaced.
            if not create or os.path.lexists(path):
                raise
            current = None
        yield current
        # The rename is durable only once the folder is on disk too.
        with contextlib.suppress(OSError):
            os.fsync(folder)
    finally:
        os.close(folder)  # and with it the lock


def _write(path: Path, records: Iterable[_Record]) -> None:
    """Replace `path` with the callers of `records`: temporary file, fsync, rename."""
    document = {"version": FILE_VERSION, "callers": [r.document() for r in records]}
    Callers.parse(document, source=f"callers file {path}")  # never write what load refuses
    text = json.dumps(document, indent=2) + "\n"
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CallersFileError(f"callers file {path} cannot be written: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), _FILE_MODE)  # mkstemp's mode already; said, not assumed
            _keep_owner(file.fileno(), path)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise CallersFileError(
                f"callers file {path} cannot be written: {exc.strerror or exc}"
            ) from None
        raise


def _keep_owner(fd: int, path: Path) -> None:
    """Give the new file (`fd`) the owner of the file it replaces, where allowed.

    So `sudo numbersvc callers add` leaves the file readable by the server's user. Only root
    may give a file away: anyone else keeps the new file as their own.
    """
    try:
        old = os.stat(path)
    except FileNotFoundError:
        return
    if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
        with contextlib.suppress(PermissionError):
            os.fchown(fd, old.st_uid, old.st_gid)
