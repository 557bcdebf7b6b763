"""How client commands reach the server: plain text or (mutual) TLS, and a bearer token.

The token travels as `authorization` metadata on every call. The flags that choose these are
`numbersvc.cli.options`'s, so that building the parser does not import grpc.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

__all__ = ["open_channel", "with_token"]


def open_channel(args: argparse.Namespace, options: list[tuple[str, Any]]) -> grpc.Channel:
    """Open a plain-text channel, or a TLS one when `--tls-ca` is given.

    Raises:
        OSError: a PEM file cannot be read.
    """
    if not args.tls_ca:
        return grpc.insecure_channel(args.target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(args.tls_ca).read_bytes(),
        certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
        private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
    )
    return grpc.secure_channel(args.target, credentials, options=options)


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
):
    """Adds `authorization: Bearer TOKEN` to every call.

    Unlike gRPC's call credentials it works over plain text too, for servers behind a
    TLS-terminating sidecar.
    """

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._metadata]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)


def with_token(channel: grpc.Channel, token: str) -> grpc.Channel:
    """Return `channel`, sending `token` as a bearer token on every call when there is one."""
    return grpc.intercept_channel(channel, _Bearer(token)) if token else channel
