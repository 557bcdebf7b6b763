"""The gatekeeper: who is calling, may they, and can their request be read at all.

Runs before any servicer code, so these answers come before validation and before anything
goes upstream (AIP-193's order):

1. Identity, when a callers file is configured: a bearer token in `authorization` metadata,
   else the client certificate's SPIFFE ID, else its common name. None of these ->
   UNAUTHENTICATED; a certificate with a SPIFFE ID is never known by its common name.
   The certificate is the one the connection verified, or, when the
   connection's peer is a trusted sidecar (`NUMBERSVC_TRUST_XFCC_FROM`) and the call carries
   `x-forwarded-client-cert`, the one the sidecar verified (`numbersvc.xfcc`): the sidecar
   terminated TLS, so the connection has no certificate of the caller's. A malformed header
   from a trusted peer is UNAUTHENTICATED, even beside a token; from any other peer the header
   is never read. An `authorization` that is not a known bearer token is UNAUTHENTICATED too:
   it never falls back to the certificate. The SPIFFE ID is the certificate's URI SAN, never a
   DNS or e-mail SAN that reads `spiffe://...`, and a certificate with more than one URI SAN
   identifies no one (the SPIFFE X.509-SVID rule). Without a callers file every caller is
   `anonymous` with every permission.
2. Permission: each method needs one (`numbers.read`, `numbers.rent` or `numbers.settle`;
   health needs none). Missing -> PERMISSION_DENIED, naming the permission (the call's record
   names the caller).
3. Decoding: request bytes that are not the method's message -> INVALID_ARGUMENT
   (`MALFORMED_REQUEST`), instead of gRPC's own INTERNAL.

The caller's name goes into the call's `CallRecord` (access log, metrics, the order ledger).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.protobuf.message import DecodeError

from numbersvc import xfcc
from numbersvc.callers import ANONYMOUS, READ, RENT, Caller, Callers
from numbersvc.errors import Outcome, ServiceError, to_status
from numbersvc.interceptors import Check, current_call, wrap_handler

__all__ = ["ANONYMOUS", "READ", "RENT", "Gatekeeper", "Identity"]

_BEARER: Final = "bearer "
# A health call's request follows its headers at once; this is plenty, and frees the slot of
# a call that never sends one (the errors table's REQUEST_NOT_SENT says 5 s too).
REQUEST_ARRIVAL_SECONDS: Final = 5.0
# grpc's typed peer properties (grpc_security_constants.h): the URI SANs alone, and the
# subject's common names. `x509_subject_alternative_name` mixes every SAN type.
_URI_SANS: Final = "peer_uri"
_COMMON_NAMES: Final = "x509_common_name"
_log = logging.getLogger("numbersvc.security")
_NO_IDENTITY: Final = (
    "this service needs a caller identity: a bearer token in `authorization` metadata, or a"
    " client certificate it knows"
)
_MALFORMED_XFCC: Final = (
    f"the {xfcc.HEADER} header from the sidecar is malformed, so it identifies no one"
)

_Context = grpc.aio.ServicerContext[Any, Any]
_NO_CHANGES: Final[Mapping[str, Any]] = {}
if TYPE_CHECKING:  # the stubs make it generic; at run time it is a plain class
    _Handler = grpc.RpcMethodHandler[Any, Any]


@dataclass(frozen=True, slots=True)
class Identity:
    """What a call presented: a bearer token, and the client certificate's names.

    Attributes:
        token: the bearer token; "" for an `authorization` that carries none (another scheme,
            an empty token), None when the call sent no `authorization` at all.
        spiffe_id: the certificate's one URI SAN when it is a SPIFFE ID, else "".
        common_names: the certificate's common names, unless it has several URI SANs.
    """

    token: str | None = None
    spiffe_id: str = ""
    common_names: tuple[str, ...] = ()

    def __repr__(self) -> str:  # the token is a secret
        token = "***" if self.token else repr(self.token)
        return f"Identity(token={token}, spiffe_id={self.spiffe_id!r})"


class _Undecodable:
    """What a request that could not be decoded becomes, so the call can answer for it."""


_UNDECODABLE: Final = _Undecodable()


class Gatekeeper:
    """Authenticates and authorizes every call, and turns undecodable requests into errors.

    The guard of the `ObservingInterceptor` (`interceptors.Guard`): its checks run inside the
    observed call, in the same wrapper, so a refusal is logged and counted like any call.

    Args:
        callers: who may call; None lets everyone in as `anonymous`.
        permissions: the permission each full method name needs; None means open (health).
            A method missing from the map is refused: new methods are closed by default.
        trusted_proxies: the networks of sidecars whose `x-forwarded-client-cert` is believed.
        certificates: whether connections carry verified client certificates (mutual TLS).
    """

    def __init__(
        self,
        callers: Callers | None,
        permissions: Mapping[str, str | None],
        trusted_proxies: Sequence[xfcc.IPNetwork] = (),
        *,
        certificates: bool = False,
    ) -> None:
        self._callers = callers
        self._permissions = dict(permissions)
        self._trusted_proxies = tuple(trusted_proxies)
        self._certificates = certificates

    def guard(
        self, handler: _Handler, details: grpc.HandlerCallDetails
    ) -> tuple[_Handler, Check | None, Mapping[str, Any]]:
        """Return the method's handler, the checks to run before it, and its lenient decoder.

        A call the headers already refuse gets a handler that refuses it without waiting for
        the request; a call open to anyone (health) one that bounds the wait for its request.
        Both carry the checks inside, and no check is returned for them.
        """
        method = details.method
        metadata = details.invocation_metadata
        token, forwarded = _bearer(metadata), _forwarded(metadata)
        decided = self._decide_at_headers(method, token, forwarded)
        check = _Check(self, method, token, forwarded, decided)
        if handler.request_streaming:
            # Streaming requests (reflection) get the same checks, their requests decoded by gRPC.
            return handler, check.enter, _NO_CHANGES
        if isinstance(decided, ServiceError) or (
            # A known caller without the permission too; `check` refuses it, naming it.
            decided is not None and not self._permits(method, decided)
        ):
            return _refusing_before_the_request(handler, check), None, _NO_CHANGES
        changes = _NO_CHANGES
        if handler.request_deserializer is not None:
            changes = _lenient(handler.request_deserializer)
        if self._permissions.get(method, "") is None:
            # NOTE: open to anyone (health), so nothing refuses a call that sends headers and
            # then nothing; bounding the wait for its request frees its RPC slot.
            checked = wrap_handler(handler, check.wrap, check.wrap_stream, **changes)
            return _with_request_within(checked, REQUEST_ARRIVAL_SECONDS), None, _NO_CHANGES
        return handler, check.enter, changes

    def _decide_at_headers(
        self, method: str, token: str | None, forwarded: Sequence[str]
    ) -> Caller | ServiceError | None:
        """Who calls `method`, or why not, when the headers alone can tell; else None.

        They can unless a trusted sidecar may have forwarded a certificate (its header counts
        only from a trusted peer's address, which the headers do not give) or the call has no
        token and mutual TLS may name the caller by its certificate. Deciding here, before the
        request arrives, lets a refusal go out at once: a call that sends headers and then
        nothing would otherwise hold one of the server's RPC slots until its connection dies.
        """
        if (forwarded and self._trusted_proxies) or (token is None and self._certificates):
            return None
        try:
            return self.identify(method, lambda: Identity(token))
        except ServiceError as error:
            return error

    def identify(self, method: str, identity: Callable[[], Identity]) -> Caller:
        """Return who calls `method`, or raise the `ServiceError` that refuses the call.

        `identity` is asked for only when there are callers to tell apart: reading the
        client certificate's names costs a little on every call. It raises `MalformedXfcc`
        for a trusted sidecar's malformed header, which identifies no one.
        """
        if method not in self._permissions:
            raise ServiceError(Outcome.PERMISSION_DENIED, f"{method} is not open to callers")
        if self._callers is None:
            return ANONYMOUS
        message = _NO_IDENTITY
        try:
            caller = _identify(self._callers, identity())
        except xfcc.MalformedXfcc as exc:
            # NOTE: what is wrong and where, never the header: it is the caller's input.
            _log.warning("malformed %s from a trusted peer: %s", xfcc.HEADER, exc)
            caller, message = None, _MALFORMED_XFCC
        if caller is not None:
            return caller
        if self._permissions[method] is None:
            return ANONYMOUS
        raise ServiceError(Outcome.CALLER_UNAUTHENTICATED, message)

    def forwarded(self, headers: Sequence[str], peer: str) -> tuple[str, tuple[str, ...]] | None:
        """Return the names a trusted sidecar forwarded, or None if `peer` forwarded none.

        Args:
            headers: the call's `x-forwarded-client-cert` values, in order.
            peer: the connection's gRPC peer (`ipv4:127.0.0.1:50000`).

        Raises:
            MalformedXfcc: `peer` is trusted and the header is malformed, or was sent more
                than once (a sidecar set to `SANITIZE_SET` or `APPEND_FORWARD` writes one).
        """
        if not headers or not xfcc.trusts(self._trusted_proxies, peer):
            return None
        if len(headers) > 1:
            raise xfcc.MalformedXfcc(f"sent {len(headers)} times")
        return xfcc.forwarded_names(headers[0])

    def _permits(self, method: str, caller: Caller) -> bool:
        try:
            self.authorize(method, caller)
        except ServiceError:
            return False
        return True

    def authorize(self, method: str, caller: Caller) -> None:
        """Raise the `ServiceError` that refuses `caller` the call to `method`, if any."""
        needed = self._permissions[method]
        if needed is not None and not caller.allows(needed):
            raise ServiceError(
                Outcome.PERMISSION_DENIED,
                f"caller {caller.name} lacks the permission {needed}",
                metadata={"permission": needed, "caller": caller.name},
            )


class _Check:
    """The checks for one call, run when the call starts (the context is needed)."""

    def __init__(
        self,
        gate: Gatekeeper,
        method: str,
        token: str | None,
        forwarded: Sequence[str],
        decided: Caller | ServiceError | None,
    ) -> None:
        self._gate = gate
        self._method = method
        self._token = token
        self._forwarded = forwarded
        self._decided = decided

    async def enter(self, request: Any, context: _Context) -> None:
        """Run the checks as the call starts, with its request (None when it is not read)."""

        def identity() -> Identity:
            # NOTE: `peer()` is read here, as the call starts (see `interceptors._Call`).
            forwarded = self._gate.forwarded(self._forwarded, context.peer())
            if forwarded is not None:  # the sidecar's certificate stands for the connection's
                return Identity(self._token, *forwarded)
            return Identity(self._token, *_certificate_names(context.auth_context()))

        call = current_call()
        try:
            if isinstance(self._decided, ServiceError):
                raise self._decided
            caller = self._decided
            if caller is None:
                caller = self._gate.identify(self._method, identity)
            if call is not None:  # before the permission check: a refusal names the caller
                call.caller = caller.name
            self._gate.authorize(self._method, caller)
            if request is _UNDECODABLE:
                raise ServiceError(
                    Outcome.MALFORMED_REQUEST, f"the request is not a valid {self._method} message"
                )
        except ServiceError as error:
            who = call.caller if call is not None else "-"
            _log.info("refused %s (caller %s): %s", self._method, who, error.outcome.name)
            await context.abort_with_status(to_status(error))

    def wrap(self, behaviour: Any) -> Any:
        async def run(request: Any, context: _Context) -> Any:
            await self.enter(request, context)
            return await behaviour(request, context)

        return run

    def wrap_stream(self, behaviour: Any) -> Any:
        async def run(request: Any, context: _Context) -> Any:
            await self.enter(request, context)
            async for response in behaviour(request, context):
                yield response

        return run


def _refusing_before_the_request(handler: _Handler, check: _Check) -> _Handler:
    """Return `handler` made to refuse its call without waiting for the request.

    A handler that takes a request stream runs as soon as the call's headers are in, and gRPC
    reads no message the handler does not ask for; the call's method and answer stay as they
    were, so the caller sees only the refusal.
    """

    async def refuse(requests: Any, context: _Context) -> None:
        await check.enter(None, context)

    async def refuse_stream(requests: Any, context: _Context) -> AsyncIterator[Any]:
        await check.enter(None, context)
        nothing: tuple[Any, ...] = ()  # an async generator, as a stream's behaviour must be
        for response in nothing:
            yield response

    streaming = handler.response_streaming
    replaced: _Handler = handler._replace(  # type: ignore[attr-defined]
        request_streaming=True,
        unary_unary=None,
        unary_stream=None,
        stream_unary=None if streaming else refuse,
        stream_stream=refuse_stream if streaming else None,
    )
    return replaced


def _with_request_within(handler: _Handler, seconds: float) -> _Handler:
    """Return `handler` made to give up on a request that does not arrive within `seconds`.

    As a handler that takes a request stream, it runs once the headers are in and reads the
    one request itself, under a bound; the method and its answers stay as they were.
    """
    name = "unary_unary" if handler.unary_unary is not None else "unary_stream"
    behaviour = getattr(handler, name)

    async def first(requests: AsyncIterator[Any], context: _Context) -> Any:
        try:
            async with asyncio.timeout(seconds):
                return await anext(requests)
        except (TimeoutError, StopAsyncIteration):
            error = ServiceError(
                Outcome.REQUEST_NOT_SENT, f"no request within {seconds:g} s of the call's headers"
            )
            await context.abort_with_status(to_status(error))

    async def run(requests: AsyncIterator[Any], context: _Context) -> Any:
        return await behaviour(await first(requests, context), context)

    async def run_stream(requests: AsyncIterator[Any], context: _Context) -> AsyncIterator[Any]:
        async for response in behaviour(await first(requests, context), context):
            yield response

    changes: dict[str, Any] = {"request_streaming": True, name: None}
    if name == "unary_unary":
        changes["stream_unary"] = run
    else:  # a response stream: yielded, or written with `context.write` (health's Watch)
        changes["stream_stream"] = run_stream if inspect.isasyncgenfunction(behaviour) else run
    replaced: _Handler = handler._replace(**changes)  # type: ignore[attr-defined]
    return replaced


def _identify(callers: Callers, identity: Identity) -> Caller | None:
    if identity.token is not None:
        # NOTE: a wrong token, or an `authorization` of another scheme, never falls back to
        # the certificate: whoever sent it meant to be someone else.
        return callers.by_token(identity.token)
    if identity.spiffe_id:
        # NOTE: an SVID identifies by its SPIFFE ID alone. Falling back to its common name
        # would let a workload the file does not know borrow a CN caller's identity.
        return callers.by_spiffe_id(identity.spiffe_id)
    for name in identity.common_names:
        if (caller := callers.by_common_name(name)) is not None:
            return caller
    return None


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """Return the bearer token of the first `authorization`; "" if it is not one; None if none."""
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
                return value[len(_BEARER) :].strip()
            return ""
    return None


def _forwarded(metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[str, ...]:
    """Return every `x-forwarded-client-cert` of the call, in order (gRPC makes them text)."""
    return tuple(str(value) for key, value in metadata or () if key == xfcc.HEADER)


def _certificate_names(auth: Mapping[str, Iterable[bytes]]) -> tuple[str, tuple[str, ...]]:
    """Return the SPIFFE ID and the common names of a verified client certificate.

    The SPIFFE ID is its URI SAN when it has exactly one and that reads `spiffe://`. A
    certificate with several URI SANs is not an SVID and identifies no one: not by any of them,
    nor by its common name.
    """
    uris = [v.decode(errors="replace") for v in auth.get(_URI_SANS, ())]
    if len(uris) > 1:
        return "", ()
    spiffe_id = uris[0] if uris and uris[0].startswith("spiffe://") else ""
    return spiffe_id, tuple(v.decode(errors="replace") for v in auth.get(_COMMON_NAMES, ()))


# One per method's decoder, made once: the handlers are gRPC's own, the same for every call.
# The same mapping every time, too: the interceptor keeps each method's wrapped handler for as
# long as its handler and changes are the ones it was made from.
@functools.lru_cache(maxsize=256)
def _lenient(decode: Callable[[bytes], Any]) -> Mapping[str, Any]:
    """Return the handler change that makes `decode`'s failures `_UNDECODABLE`."""

    def lenient(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError:
            return _UNDECODABLE

    return MappingProxyType({"request_deserializer": lenient})
