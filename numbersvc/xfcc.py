r"""The caller's certificate as a mesh sidecar forwards it: Envoy's `x-forwarded-client-cert`.

Behind Envoy or Istio, the sidecar terminates mTLS and passes the client certificate's names
on in the XFCC header. Envoy's format: elements separated by `,` (one per proxy that added
one), each element `key=value` pairs separated by `;`; keys are case-insensitive (`By`,
`Hash`, `Cert`, `Chain`, `Subject`, `URI`, `DNS`); a value holding `,`, `;` or `=` is
double-quoted, with `\"` for a quote inside. Envoy writes the subject quoted, as OpenSSL's
RFC 2253 string (`Subject="CN=billing,O=Example"`), and `URI=` empty for a certificate
without a URI SAN.

`forwarded_names` reads the element the nearest proxy added, the last one: with
`SANITIZE_SET` it is the only one, with `APPEND_FORWARD` the sidecar appends its own after
whatever the caller sent. Its SPIFFE ID is the element's one `URI`; an element with several
identifies no one (the X.509-SVID rule, as for a certificate numbersvc verifies itself).

Whether to believe the header at all is the gatekeeper's decision (`trusts`, the connection's
peer against `NUMBERSVC_TRUST_XFCC_FROM`). This module knows no gRPC, and its errors never
quote the header: a message says what is wrong and where, by offset.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from typing import Final

__all__ = [
    "HEADER",
    "MAX_HEADER_BYTES",
    "IPNetwork",
    "MalformedXfcc",
    "common_names",
    "forwarded_names",
    "parse",
    "parse_networks",
    "peer_address",
    "trusts",
]

HEADER: Final = "x-forwarded-client-cert"
MAX_HEADER_BYTES: Final = 8192
"""A longer header is malformed: Istio's URI and Subject fit many times over."""

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Element = tuple[tuple[str, str], ...]
"""One proxy's element: its (lowercased key, value) pairs in the order written."""

_KEY: Final = re.compile(r"[A-Za-z]+")
# Envoy writes these once per element; two would leave the caller ambiguous.
_ONCE: Final = frozenset({"hash", "cert", "chain", "subject"})
# RFC 4514: the characters a backslash may escape in a distinguished name's value.
_DN_ESCAPABLE: Final = frozenset(' "#+,;<=>\\')
_COMMON_NAME_TYPES: Final = frozenset({"cn", "2.5.4.3", "oid.2.5.4.3"})


class MalformedXfcc(ValueError):
    """The header is not Envoy's format, or too long; the message never quotes it."""


def parse(header: str) -> tuple[Element, ...]:
    r"""Split an XFCC header into its elements, unquoting the values.

    Inside a quoted value `\"` is a quote; any other backslash pair is kept as written, so
    that the escapes of a distinguished name (`\,`, `\\`) reach `common_names` intact.

    Raises:
        MalformedXfcc: over `MAX_HEADER_BYTES`, an empty element or pair, a key that is not
            letters, a pair without `=`, a stray or unterminated quote, or a key of `_ONCE`
            twice in an element.
    """
    if len(header.encode()) > MAX_HEADER_BYTES:
        raise MalformedXfcc(f"longer than {MAX_HEADER_BYTES} bytes")
    elements: list[Element] = []
    pairs: list[tuple[str, str]] = []
    at = 0
    while True:
        equals = header.find("=", at)
        key = header[at:equals]
        if equals < 0 or not _KEY.fullmatch(key):
            raise MalformedXfcc(f"no key=value at offset {at}")
        value, at = _value(header, equals + 1)
        pairs.append((key.lower(), value))
        if at < len(header) and header[at] == ";":
            at += 1
            continue
        elements.append(_element(pairs, len(elements)))
        pairs = []
        if at == len(header):
            return tuple(elements)
        at += 1  # a comma: `_value` stops at nothing else


def _value(header: str, at: int) -> tuple[str, int]:
    """Read the value starting at `at`; return it and the offset of what ends it."""
    if header.startswith('"', at):
        chars: list[str] = []
        i = at + 1
        while i < len(header) and header[i] != '"':
            pair = header[i : i + 2]
            if pair[0] == "\\" and len(pair) == 2:
                chars.append('"' if pair == '\\"' else pair)
                i += 2
            else:
                chars.append(pair[0])
                i += 1
        if i >= len(header):
            raise MalformedXfcc(f"unterminated quoted value at offset {at}")
        end = i + 1
        if end < len(header) and header[end] not in ",;":
            raise MalformedXfcc(f"text after a quoted value at offset {end}")
        return "".join(chars), end
    end = at
    while end < len(header) and header[end] not in ',;"':
        end += 1
    if end < len(header) and header[end] == '"':
        raise MalformedXfcc(f"a quote inside an unquoted value at offset {end}")
    return header[at:end], end


def _element(pairs: list[tuple[str, str]], index: int) -> Element:
    keys = [key for key, _ in pairs]
    for key in _ONCE:
        if keys.count(key) > 1:
            raise MalformedXfcc(f"element {index} has {key} more than once")
    return tuple(pairs)


def forwarded_names(header: str) -> tuple[str, tuple[str, ...]]:
    """Return the SPIFFE ID and the common names of the nearest proxy's (last) element.

    The SPIFFE ID is the element's `URI` when it has exactly one and that reads `spiffe://`;
    an element with several `URI` identifies no one, by none of its names.

    Raises:
        MalformedXfcc: the header, or the element's subject, is malformed.
    """
    element = parse(header)[-1]
    uris = [value for key, value in element if key == "uri"]
    if len(uris) > 1:
        return "", ()
    spiffe_id = uris[0] if uris and uris[0].startswith("spiffe://") else ""
    subject = next((value for key, value in element if key == "subject"), "")
    return spiffe_id, common_names(subject)


def common_names(subject: str) -> tuple[str, ...]:
    r"""Return the common names of a distinguished name written as RFC 4514 (or 2253) says.

    Attribute types are case-insensitive (`CN`, `cn`, `2.5.4.3`); values may escape a special
    character (`\,`) or a UTF-8 byte (`\c3\a9`). An empty subject has none.

    Raises:
        MalformedXfcc: an attribute without `=`, a bad escape, or a common name in the
            `#hex` (BER) form, which no certificate writer uses for a string.
    """
    names: list[str] = []
    for attribute in _split_unescaped(subject, ",+") if subject else ():
        kind, equals, raw = attribute.partition("=")
        if not equals or not kind.strip():
            raise MalformedXfcc("an attribute of the subject has no type=value")
        if kind.strip().lower() in _COMMON_NAME_TYPES:
            if raw.startswith("#"):
                raise MalformedXfcc("a common name in the #hex form")
            names.append(_unescape_dn(raw))
    return tuple(names)


def _split_unescaped(text: str, separators: str) -> list[str]:
    parts: list[str] = []
    start = i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] in separators:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _unescape_dn(raw: str) -> str:
    out = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char != "\\":
            out += char.encode()
            i += 1
            continue
        pair = raw[i + 1 : i + 3]
        if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
            out.append(int(pair, 16))
            i += 3
        elif pair[:1] and pair[0] in _DN_ESCAPABLE:
            out += pair[0].encode()
            i += 2
        else:
            raise MalformedXfcc("a bad escape in the subject")
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise MalformedXfcc("the subject's escapes are not UTF-8") from None


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Parse a comma-separated list of CIDRs (`127.0.0.0/8,::1/128`; an address alone: /32, /128).

    Raises:
        ValueError: an entry is not a network, or has host bits set (`127.0.0.1/8`).
    """
    entries = [entry.strip() for entry in text.split(",")]
    if not all(entries):
        raise ValueError("an empty entry in the list")
    return tuple(ipaddress.ip_network(entry, strict=True) for entry in entries)


def peer_address(peer: str) -> _IPAddress | None:
    """Return the IP address of a gRPC peer string, or None for another kind (`unix:`).

    gRPC writes `ipv4:127.0.0.1:50000` and `ipv6:%5B::1%5D:50000` (the brackets
    percent-encoded). An IPv4 address mapped into IPv6 (`::ffff:10.0.0.1`) is the IPv4 one.
    """
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = urllib.parse.unquote(rest).rpartition(":")[0].removeprefix("[").removesuffix("]")
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # without an IPv6 zone
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def trusts(networks: Sequence[IPNetwork], peer: str) -> bool:
    """Whether the gRPC `peer` connects from one of `networks`."""
    address = peer_address(peer)
    return address is not None and any(address in network for network in networks)
