"""Server assembly: upstream, servicer, health, reflection, interceptors, graceful shutdown.

`create_server(config)` builds and starts everything and returns a `RunningServer` with the
bound port (so tests listen on port 0). `serve(config)` runs until SIGTERM or SIGINT, then
shuts down in order: health NOT_SERVING, a drain delay for load balancers to notice, the
gRPC server's grace period for calls in flight, rent orders in flight, the upstream client,
and the embedded sandbox last.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from numbersvc import __version__
from numbersvc.config import Config, UpstreamKind
from numbersvc.interceptors import AccessLogInterceptor
from numbersvc.ledger import OrderLedger, SqliteLedger
from numbersvc.orders import RentDesk
from numbersvc.sandbox import SandboxServer
from numbersvc.service import NumberGroupServicer
from numbersvc.upstream import PlivoClient
from numbersvc.upstream.ratelimit import TokenBucket, parse_rate
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

__all__ = ["SERVICE_NAME", "RunningServer", "create_server", "serve"]

SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["NumberGroupService"].full_name
UPSTREAM_METADATA_KEY: Final = "numbersvc-upstream"
_log = logging.getLogger("numbersvc.server")
_MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024


class _HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """The standard health service, also saying which upstream is in use (initial metadata)."""

    def __init__(self, upstream: UpstreamKind) -> None:
        super().__init__()
        self._metadata = ((UPSTREAM_METADATA_KEY, upstream.value),)

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> health_pb2.HealthCheckResponse:
        """Answer a health check, with `numbersvc-upstream: plivo|sandbox` metadata."""
        await context.send_initial_metadata(self._metadata)
        return await super().Check(request, context)


@dataclass
class RunningServer:
    """A started server and what it owns, stopped in order by `stop`."""

    server: grpc.aio.Server
    port: int
    upstream_kind: UpstreamKind
    health: _HealthServicer
    servicer: NumberGroupServicer
    upstream: PlivoClient
    rent_desk: RentDesk
    ledger: OrderLedger
    sandbox: SandboxServer | None

    async def stop(self, *, drain_seconds: float = 0.0, grace_seconds: float = 0.0) -> None:
        """Stop serving: NOT_SERVING, drain, stop with grace, then close what it owns."""
        await self.health.enter_graceful_shutdown()
        if drain_seconds:
            _log.info("health NOT_SERVING; draining for %.1f s", drain_seconds)
            await asyncio.sleep(drain_seconds)
        self.servicer.begin_shutdown()
        await self.server.stop(grace_seconds)
        await self.rent_desk.drain(grace_seconds)
        await self.upstream.aclose()
        await self.ledger.close()
        if self.sandbox is not None:
            await self.sandbox.stop()
        _log.info("stopped")


async def create_server(config: Config) -> RunningServer:
    """Build and start the server on `config.listen` (port 0 picks a free port).

    Raises:
        ConfigError: the upstream settings contradict each other.
        RuntimeError: the address cannot be bound.
    """
    kind = config.resolved_upstream()
    sandbox: SandboxServer | None = None
    if kind is UpstreamKind.SANDBOX:
        sandbox = SandboxServer(host="127.0.0.1", port=0, seed=config.sandbox_seed)
        await sandbox.start()
        base_url, auth_id, token = sandbox.base_url, sandbox.auth_id, sandbox.auth_token
        _log.warning(
            "UPSTREAM IS THE EMBEDDED SANDBOX at %s: nothing real is searched or rented. "
            "Set PLIVO_AUTH_ID and PLIVO_AUTH_TOKEN to use Plivo.",
            base_url,
        )
    else:
        base_url, auth_id = config.plivo_base_url, config.plivo_auth_id
        token = config.plivo_auth_token.reveal()
        _log.info("upstream is Plivo at %s (account %s)", base_url, auth_id)
    rate = parse_rate(config.upstream_rate)
    upstream = PlivoClient(
        base_url=base_url,
        auth_id=auth_id,
        auth_token=token,
        user_agent=f"numbersvc/{__version__}",
        max_connections=config.upstream_max_connections,
        max_keepalive_connections=config.upstream_max_connections,
        rate_limiter=None if rate is None else TokenBucket(rate),
    )
    ledger_path = config.resolved_ledger_path()
    ledger = await SqliteLedger.open(ledger_path)
    await ledger.recover()
    _log.info("order ledger at %s", ledger_path)
    rent_desk = RentDesk(
        upstream=upstream,
        ledger=ledger,
        rent_timeout_seconds=config.rent_timeout_seconds,
        daily_cap=config.daily_rent_cap,
    )
    server = grpc.aio.server(
        interceptors=[AccessLogInterceptor()],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ],
    )
    servicer = NumberGroupServicer(
        config=config, upstream=upstream, rent_desk=rent_desk, ledger=ledger
    )
    pb_grpc.add_NumberGroupServiceServicer_to_server(servicer, server)
    health_servicer = _HealthServicer(kind)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(config.listen)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = config.listen.rpartition(":")[0]
    _log.info("numbersvc %s serving on %s:%d (upstream: %s)", __version__, host, port, kind.value)
    return RunningServer(
        server=server,
        port=port,
        upstream_kind=kind,
        health=health_servicer,
        servicer=servicer,
        upstream=upstream,
        rent_desk=rent_desk,
        ledger=ledger,
        sandbox=sandbox,
    )


async def serve(config: Config) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully.

    Returns:
        The process exit code: 0 after a graceful shutdown.
    """
    running = await create_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        _log.info("signal received: shutting down")
    finally:
        await running.stop(
            drain_seconds=config.drain_seconds, grace_seconds=config.shutdown_grace_seconds
        )
    return 0
