"""Server assembly: upstream, servicer, health, reflection, interceptors, graceful shutdown.

`create_server(config)` builds and starts everything and returns a `RunningServer` with the
bound port (so tests listen on port 0). `serve(config)` runs until SIGTERM or SIGINT, then
shuts down in order: health NOT_SERVING, a drain delay for load balancers to notice, the
gRPC server's grace period for calls in flight (rent orders in flight get most of it, then are
recorded as outcome unknown and their callers told so before it ends), the upstream client,
the ledger, and the embedded sandbox last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from numbersvc import __version__, tracing
from numbersvc.callers import CALLERS_FILE_ENV, SETTLE, Callers
from numbersvc.config import Config, ConfigError, UpstreamKind, parse_host_port
from numbersvc.errors import Outcome, ServiceError, to_status
from numbersvc.gatekeeper import READ, RENT, Gatekeeper
from numbersvc.interceptors import AccessLog, ObservingInterceptor, current_call, upstream_headers
from numbersvc.ledger import LedgerLockedError, LedgerUnreachableError, OrderLedger, SqliteLedger
from numbersvc.ledger.budget import SharedBudget
from numbersvc.ledger.budgetstores import open_budget_store
from numbersvc.metrics import Metrics, MetricsServer
from numbersvc.orders import RentDesk, send_window_seconds
from numbersvc.sandbox import SandboxServer
from numbersvc.service import NumberGroupServicer
from numbersvc.upstream import PlivoClient
from numbersvc.upstream.ratelimit import TokenBucket, parse_rate
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

__all__ = ["SERVICE_NAME", "LeaseKeeper", "RunningServer", "create_server", "serve"]

SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["NumberGroupService"].full_name
UPSTREAM_METADATA_KEY: Final = "numbersvc-upstream"
_log = logging.getLogger("numbersvc.server")
_MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
# NOTE: grpc's default refuses metadata between 8 and 16 KiB at random (a soft limit). One
# limit makes a call's fate depend on its size alone: an XFCC over its own 8 KiB cap reaches
# the gatekeeper, which refuses it as malformed, every time.
_MAX_METADATA_BYTES: Final = 16 * 1024
_HEALTH_SERVICE_NAME: Final = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Kept back from the shutdown grace period (at most half of it) for the callers of rent
# orders given up on to get RENT_OUTCOME_UNKNOWN before the server cancels their calls.
_RENT_ANSWER_SECONDS: Final = 1.0
# While the store is down, the heartbeat probes it this often: rents are refused at once
# meanwhile (`RentDesk.store_reachable`), so its return must be noticed soon.
_DOWN_PROBE_SECONDS: Final = 1.0
# Net container allocations between two young-generation collections once serving. With
# CPython's 700 a server under load collected every ~15 calls and, every 100 of those, walked
# the whole heap (37 ms once in a 4 s bench phase); at 5,000, one ~1.4 ms pause every ~250.
GC_YOUNG_THRESHOLD: Final = 5_000


class _HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """The standard health service, also saying which upstream is in use (initial metadata).

    Health needs no identity (probes call it), so its long-lived `Watch` streams have a budget
    of their own, `max_watches`, on top of the RPC cap (`_grpc_server`): open streams beyond it
    are refused, and however many are open, the API keeps its whole cap.
    """

    def __init__(self, upstream: UpstreamKind, max_watches: int) -> None:
        super().__init__()
        self._metadata = ((UPSTREAM_METADATA_KEY, upstream.value),)
        self._max_watches = max_watches
        self._watches = 0

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> health_pb2.HealthCheckResponse:
        """Answer a health check, with `numbersvc-upstream: plivo|sandbox` metadata."""
        await context.send_initial_metadata(self._metadata)
        return await super().Check(request, context)

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Stream the health status while fewer than `max_watches` streams are open."""
        if self._watches >= self._max_watches:
            refused = ServiceError(
                Outcome.HEALTH_WATCHES_EXHAUSTED,
                f"{self._max_watches} health Watch streams are open already"
                " (NUMBERSVC_MAX_HEALTH_WATCHES); use Check, or try later",
            )
            await context.abort_with_status(to_status(refused))
        self._watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self._watches -= 1


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
    metrics: Metrics
    metrics_server: MetricsServer | None
    sandbox: SandboxServer | None
    lease_keeper: LeaseKeeper
    budget: SharedBudget | None = None
    tracing: tracing.Tracing | None = None

    async def stop(self, *, drain_seconds: float = 0.0, grace_seconds: float = 0.0) -> None:
        """Stop serving: NOT_SERVING, drain, stop with grace, then close what it owns.

        Rent orders still out near the end of the grace period are given up on: recorded as
        outcome unknown, their callers answered, before the grace ends and the ledger closes.
        """
        await self.health.enter_graceful_shutdown()
        self.metrics.health_serving.set(0)
        if drain_seconds:
            _log.info("health NOT_SERVING; draining for %.1f s", drain_seconds)
            await asyncio.sleep(drain_seconds)
        self.servicer.begin_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace_seconds))
        try:
            await self.rent_desk.stop(grace_seconds - min(_RENT_ANSWER_SECONDS, grace_seconds / 2))
        finally:
            await stopping
        if self.tracing is not None:  # every call has ended: its spans are all queued
            await self.tracing.shutdown()
        await self.upstream.aclose()
        if self.budget is not None:
            await self.budget.close()
        await self.lease_keeper.stop()
        await self.ledger.close()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.sandbox is not None:
            await self.sandbox.stop()
        _log.info("stopped")


async def create_server(config: Config) -> RunningServer:
    """Build and start the server on `config.listen` (port 0 picks a free port).

    Whatever started before a failure (an address in use, an unreadable ledger) is stopped
    again before the error propagates.

    Raises:
        ConfigError: the upstream settings contradict each other, or the gRPC or metrics
            address cannot be bound.
        OSError: a file named by a setting (TLS) cannot be read.
        sqlite3.Error: the ledger cannot be opened.
    """
    kind = config.resolved_upstream()
    metrics = Metrics()
    async with contextlib.AsyncExitStack() as undo:
        try:
            traces = tracing.start()
        except ValueError as exc:  # an OTLP protocol we do not speak
            raise ConfigError(str(exc)) from None
        if traces is not None:
            undo.push_async_callback(traces.shutdown)
        metrics_server = await _metrics_server(config, metrics)
        if metrics_server is not None:
            undo.push_async_callback(metrics_server.stop)
        # Read once (its file may be rotated): the ledger and the budget share one store.
        database = config.database().reveal()
        sandbox, upstream, budget = await _upstream(config, kind, metrics, undo, database)
        ledger = await _open_ledger(config, database, metrics)
        undo.push_async_callback(ledger.close)
        rent_desk = RentDesk(
            upstream=upstream,
            ledger=ledger,
            rent_timeout_seconds=config.rent_timeout_seconds,
            daily_cap=config.daily_rent_cap,
            metrics=metrics,
        )
        servicer = NumberGroupServicer(
            config=config, upstream=upstream, rent_desk=rent_desk, ledger=ledger, metrics=metrics
        )
        health_servicer = _HealthServicer(kind, config.max_health_watches)
        callers = (
            Callers.load(config.callers_file, strict_mode=True) if config.callers_file else None
        )
        gatekeeper = Gatekeeper(
            callers,
            method_permissions(with_reflection=config.reflection),
            trusted_proxies=config.trusted_xfcc_networks(),
            certificates=bool(config.tls_client_ca),
        )
        # The gatekeeper's checks run inside the observed call: its refusals are logged too.
        interceptors = [ObservingInterceptor([AccessLog(), metrics], guard=gatekeeper)]
        server = _grpc_server(config, interceptors)
        pb_grpc.add_NumberGroupServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if config.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, _HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        port = _listen(server, config, callers)
        await server.start()
        undo.push_async_callback(server.stop, None)
        # Only once the port is ours: a second server on a taken port recovers nothing.
        lease_keeper = await LeaseKeeper.start(
            ledger,
            metrics,
            config.instance_lease_seconds,
            store="postgresql" if database else "sqlite",
            reachable=rent_desk.store_reachable,
        )
        undo.push_async_callback(lease_keeper.stop)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        metrics.health_serving.set(1)
        undo.pop_all()  # started: from here on RunningServer.stop owns the shutdown
    host = parse_host_port(config.listen)[0]
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
        metrics=metrics,
        metrics_server=metrics_server,
        sandbox=sandbox,
        lease_keeper=lease_keeper,
        budget=budget,
        tracing=traces,
    )


class LeaseKeeper:
    """Keeps this process's ledger lease alive, recovering orders no POST can still be out for.

    A heartbeat runs at start, then every third of the lease, so two can fail in a row before
    the lease lapses. A failure is counted every time but logged once per outage: the store
    may be down for a while, and a log line per tick would bury everything else.
    """

    def __init__(
        self,
        ledger: OrderLedger,
        metrics: Metrics,
        lease_seconds: float,
        *,
        store: str,
        reachable: Callable[[bool], object] | None = None,
    ) -> None:
        self._ledger = ledger
        self._metrics = metrics
        self._store = store
        self._interval = lease_seconds / 3
        self._failing = False
        self._reachable = reachable
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        ledger: OrderLedger,
        metrics: Metrics,
        lease_seconds: float,
        *,
        store: str,
        reachable: Callable[[bool], object] | None = None,
    ) -> LeaseKeeper:
        """Run the first heartbeat now, then keep beating in a background task.

        `store` names the ledger's store in the metrics: sqlite or postgresql. `reachable`
        hears each beat's result (the rent desk's breaker): False when it found the store out
        of reach (`LedgerUnreachableError`), else True.
        """
        keeper = cls(ledger, metrics, lease_seconds, store=store, reachable=reachable)
        await keeper.beat()
        keeper._task = asyncio.create_task(keeper._keep(), name="ledger heartbeat")
        return keeper

    async def beat(self) -> None:
        """Run one heartbeat; a failure is logged (once per outage) and counted, never raised."""
        try:
            found = await self._ledger.heartbeat()
        except Exception as exc:
            # Known down: out of reach. Not a lock held past the wait (a SQLite file locked for
            # a while, a PostgreSQL session holding the leases' table): the store answers, and
            # claims wait out or never meet that lock by themselves.
            down = isinstance(exc, LedgerUnreachableError) and not isinstance(
                exc, LedgerLockedError
            )
            # A lock is no outage: store_up pages an operator (NumbersvcStoreDown).
            self._metrics.heartbeat(self._store, None, reached=isinstance(exc, LedgerLockedError))
            if not self._failing:
                # One line, no traceback: a store that is down is an outage, not a bug.
                _log.error(
                    "ledger heartbeat failed (%s: %s): the lease is not renewed (retrying every"
                    " %.1f s)",
                    type(exc).__name__,
                    str(exc).partition("\n")[0],
                    self._interval,
                )
            self._failing = True
            self._tell(not down)
            return
        self._metrics.heartbeat(self._store, found)
        if self._failing:
            _log.warning("ledger heartbeat works again")
        self._failing = False
        self._tell(True)

    def _tell(self, up: bool) -> None:
        if self._reachable is not None:
            self._reachable(up)

    async def stop(self) -> None:
        """Stop beating (before the ledger closes and removes the lease)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _keep(self) -> None:
        while True:
            # Probed more often while down: rents are refused until a beat reaches the store.
            await asyncio.sleep(
                min(self._interval, _DOWN_PROBE_SECONDS) if self._failing else self._interval
            )
            await self.beat()


async def _open_ledger(config: Config, database: str, metrics: Metrics) -> OrderLedger:
    """Open the order ledger: PostgreSQL when `database` (its URL) is set, else the SQLite file.

    A PostgreSQL ledger's connection pool is exported in `metrics`.

    Raises:
        ConfigError: the database URL does not parse.
        LedgerSchemaError: the store was written by a newer numbersvc.
        LedgerUnreachableError: PostgreSQL cannot be reached.
        sqlite3.Error: the SQLite file cannot be opened.
    """
    lease_seconds = config.instance_lease_seconds
    # After that, no POST of an order claimed by this process is still out.
    send_timeout_seconds = send_window_seconds(config.rent_timeout_seconds)
    if not database:
        path = config.resolved_ledger_path()
        ledger: OrderLedger = await SqliteLedger.open(
            path, lease_seconds=lease_seconds, send_timeout_seconds=send_timeout_seconds
        )
        _log.info("order ledger at %s (instance %s)", path, ledger.instance)
        return ledger
    # Imported here: psycopg loads only where PostgreSQL is used.
    from numbersvc.ledger import postgres

    try:
        ledger = await postgres.PostgresLedger.open(
            database,
            pool_max=config.database_pool_max,
            lease_seconds=lease_seconds,
            send_timeout_seconds=send_timeout_seconds,
        )
    except ValueError as exc:  # a URL libpq cannot parse; the message does not quote it
        raise ConfigError(f"NUMBERSVC_DATABASE_URL: {exc}") from None
    metrics.watch_pool(ledger.pool_stats)
    _log.info(
        "order ledger in PostgreSQL at %s (instance %s, at most %d connections)",
        postgres.redacted(database),
        ledger.instance,
        config.database_pool_max,
    )
    return ledger


async def _upstream(
    config: Config,
    kind: UpstreamKind,
    metrics: Metrics,
    undo: contextlib.AsyncExitStack,
    database: str,
) -> tuple[SandboxServer | None, PlivoClient, SharedBudget | None]:
    """Start the embedded sandbox if it is the upstream, and the one shared Plivo client.

    Also returns the account's request budget when the store keeps it (None: in memory, or no
    budget), for `RunningServer.stop` to close.
    """
    sandbox: SandboxServer | None = None
    if kind is UpstreamKind.SANDBOX:
        sandbox = SandboxServer(host="127.0.0.1", port=0, seed=config.sandbox_seed)
        await sandbox.start()
        undo.push_async_callback(sandbox.stop)
        base_url, auth_id, token = sandbox.base_url, sandbox.auth_id, sandbox.auth_token
        _log.warning(
            "UPSTREAM IS THE EMBEDDED SANDBOX at %s: nothing real is searched or rented. "
            "Set PLIVO_AUTH_ID and PLIVO_AUTH_TOKEN to use Plivo.",
            base_url,
        )
        _log.info(
            "sandbox controls (no auth; docs/sandbox.md lists them): curl -s %s/info",
            sandbox.control_url,
        )
    else:
        base_url, auth_id = config.plivo_base_url, config.plivo_auth_id
        token = config.plivo_token().reveal()
        _log.info("upstream is Plivo at %s (account %s)", base_url, auth_id)
    limiter = await _rate_limiter(config, auth_id, metrics, undo, database)

    def observe(operation: str, outcome: str, seconds: float, api_id: str | None) -> None:
        metrics.upstream_response(operation, outcome, seconds)
        call = current_call()
        if call is not None:
            call.upstream.append(f"{operation}:{outcome}:{api_id or '-'}")

    client = PlivoClient(
        base_url=base_url,
        auth_id=auth_id,
        auth_token=token,
        max_connections=config.upstream_max_connections,
        max_keepalive_connections=config.upstream_max_connections,
        http_stack=config.upstream_http_stack,
        rate_limiter=limiter,
        observer=observe,
        headers=upstream_headers,
    )
    undo.push_async_callback(client.aclose)
    return sandbox, client, limiter if isinstance(limiter, SharedBudget) else None


async def _rate_limiter(
    config: Config,
    account: str,
    metrics: Metrics,
    undo: contextlib.AsyncExitStack,
    database: str,
) -> TokenBucket | SharedBudget | None:
    """Build the account's request budget; None when it is off.

    It lives in the ledger's store (PostgreSQL, or the SQLite file that processes on this host
    share), or in memory beside an in-memory ledger, which nothing shares.
    """
    rate = parse_rate(config.upstream_rate)
    if rate is None:
        return None
    store = open_budget_store(database_url=database, ledger_path=config.resolved_ledger_path())
    limiter: TokenBucket | SharedBudget
    if store is None:
        limiter = TokenBucket(rate)
    else:
        limiter = SharedBudget(store, f"plivo:{account}", rate, fallback=config.fallback_rate())
        undo.push_async_callback(limiter.close)
        metrics.watch_budget(limiter)
    metrics.watch_rate_limiter(limiter)
    return limiter


def method_permissions(*, with_reflection: bool) -> dict[str, str | None]:
    """Return the permission each full method name needs; None for open ones (health)."""
    service = pb.DESCRIPTOR.services_by_name["NumberGroupService"]
    needs = {
        "ListNumberGroups": READ,
        "StreamNumberGroups": READ,
        "GetNumberGroup": READ,
        "GetRentalOrder": READ,
        "ListRentalOrders": READ,
        "RentNumbers": RENT,
        "SettleRentalOrder": SETTLE,
    }
    permissions: dict[str, str | None] = {
        f"/{service.full_name}/{method.name}": needs[method.name] for method in service.methods
    }
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    permissions.update({f"/{health.full_name}/{m.name}": None for m in health.methods})
    if with_reflection:
        permissions[f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"] = READ
    return permissions


def _bind(server: grpc.aio.Server, config: Config, callers: Callers | None) -> int:
    """Listen with TLS (mutual when a client CA is set) or, with a warning, in plain text.

    Without callers, anyone who reaches the port may rent: said as loudly as plain text.
    """
    if callers is None:
        _log.warning(
            "ACCESS CONTROL IS OFF (no %s): every caller may search and RENT numbers,"
            " as `anonymous`",
            CALLERS_FILE_ENV,
        )
    else:
        _log.info("callers file %s: %d callers", config.callers_file, len(callers))
    if config.trust_xfcc_from:
        _log.info(
            "x-forwarded-client-cert names the caller when it comes from %s%s",
            config.trust_xfcc_from,
            "" if callers is not None else " (no effect: no callers file)",
        )
    if not config.tls_cert:
        _log.warning(
            "gRPC port %s is PLAIN TEXT (no NUMBERSVC_TLS_CERT): only behind a mesh sidecar or"
            " on a trusted network",
            config.listen,
        )
        if callers is not None:
            _log.warning("bearer tokens will cross the network in plain text")
        return server.add_insecure_port(config.listen)
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    _check_tls_files(config)  # once they have been read: a missing one says so
    credentials = grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    _log.info(
        "gRPC port %s uses TLS%s", config.listen, " with client certificates" if client_ca else ""
    )
    return server.add_secure_port(config.listen, credentials)


def _check_tls_files(config: Config) -> None:
    """Raise a `ConfigError` naming the TLS setting whose file cannot be used.

    NOTE: gRPC reports any of these only as "Failed to bind", which `_listen` must take for a
    taken address; OpenSSL, through `ssl`, says which file is at fault.
    """
    checks = [
        ("NUMBERSVC_TLS_CERT", config.tls_cert, "holds no PEM certificate"),
        (
            "NUMBERSVC_TLS_KEY",
            config.tls_key,
            "is not an unencrypted PEM private key of NUMBERSVC_TLS_CERT's certificate",
        ),
        ("NUMBERSVC_TLS_CLIENT_CA", config.tls_client_ca, "holds no PEM CA certificate"),
    ]
    for env, path, fault in checks:
        if not path:
            continue
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            if env == "NUMBERSVC_TLS_KEY":
                # A password callback that fails, so that OpenSSL never prompts on a terminal.
                context.load_cert_chain(config.tls_cert, path, password=lambda: b"")
            else:
                context.load_verify_locations(cafile=path)
        except ssl.SSLError as exc:
            raise ConfigError(f"{env}: {path} {fault} ({exc.reason or exc})") from None


def _listen(server: grpc.aio.Server, config: Config, callers: Callers | None) -> int:
    """`_bind`, with a port that cannot be had reported as the setting that named it."""
    try:
        return _bind(server, config, callers)
    except RuntimeError as exc:  # grpc says only "Failed to bind" (the cause goes to its log)
        raise ConfigError(
            f"NUMBERSVC_LISTEN: cannot listen on {config.listen}: the address is in use by"
            " another process (another numbersvc?) or is not this host's; set another HOST:PORT"
            " (port 0: any free one) with NUMBERSVC_LISTEN or --listen"
        ) from exc


def _grpc_server(
    config: Config, interceptors: Sequence[grpc.aio.ServerInterceptor]
) -> grpc.aio.Server:
    """Build the grpc.aio server with keepalive and connection-age settings for meshes, L4s."""
    seconds = 1000  # grpc takes milliseconds
    options: list[tuple[str, int]] = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_metadata_size", _MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", _MAX_METADATA_BYTES),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_seconds * seconds)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_seconds * seconds)),
        # Clients may ping as often as every 10 s (grpc-go's minimum), even without calls.
        ("grpc.http2.min_ping_interval_without_data_ms", 10 * seconds),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if config.max_connection_age_seconds:
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * seconds)),
            (
                "grpc.max_connection_age_grace_ms",
                int(config.max_connection_age_grace_seconds * seconds),
            ),
        ]
    # The health watches' own budget comes on top, so that open streams never take the API's.
    cap = config.max_concurrent_rpcs and config.max_concurrent_rpcs + config.max_health_watches
    return grpc.aio.server(
        interceptors=interceptors, options=options, maximum_concurrent_rpcs=cap or None
    )


async def _metrics_server(config: Config, metrics: Metrics) -> MetricsServer | None:
    if config.metrics_listen == "off":
        return None
    host, port = parse_host_port(config.metrics_listen)
    server = MetricsServer(metrics, host, port)
    try:
        await server.start()
    except OSError as exc:
        await server.stop()
        # NOTE: a host that does not resolve is a gaierror, whose errno is the resolver's
        # (-2), not errno's: `os.strerror` read "Unknown error -2" for it. A bind error's own
        # strerror is asyncio's long sentence, so errno's words are kept for it.
        lookup = isinstance(exc, socket.gaierror)
        why = exc.strerror if lookup else os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(
            f"NUMBERSVC_METRICS_LISTEN: cannot listen on {config.metrics_listen}:"
            f" {why}{'' if lookup else ' (another numbersvc?)'}; set another"
            " HOST:PORT (port 0: any free one), or off, with NUMBERSVC_METRICS_LISTEN or"
            " --metrics-listen"
        ) from exc
    _log.info("metrics on http://%s:%d/metrics", host, server.port)
    return server


def settle_heap() -> None:
    """Take what start-up built out of the garbage collector's sight, and collect less often.

    Modules, protobuf descriptors, grpc and the servicer live as long as the process: frozen
    (`gc.freeze`), no collection walks them again. A call's containers die with it, nearly all
    by reference count; a higher young threshold looks for the few cycles among them every
    few hundred calls instead of every ten (docs/performance.md, "What changed").
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


async def serve(config: Config) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully.

    Returns:
        The process exit code: 0 after a graceful shutdown.
    """
    # NOTE: before the server starts: the port takes calls before `create_server` returns,
    # and a SIGTERM then (the default action) killed the process with its rents in flight.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await _start_unless_stopped(config, stop)
    if running is None:
        _log.info("signal received while starting: stopped before serving")
        return 0
    settle_heap()
    try:
        await stop.wait()
        _log.info("signal received: shutting down")
    finally:
        await running.stop(
            drain_seconds=config.drain_seconds, grace_seconds=config.shutdown_grace_seconds
        )
    return 0


async def _start_unless_stopped(config: Config, stop: asyncio.Event) -> RunningServer | None:
    """Start the server, or give up when `stop` is set first (None).

    NOTE: start-up may wait for long (the migration lock another replica or a `db migrate`
    Job holds, a database that does not answer): a SIGTERM meanwhile must end it then, or the
    orchestrator kills the process after its grace period. Cancelled, `create_server` undoes
    what it started (its exit stack), and a lock wait is cancelled in the database too.
    """
    starting = asyncio.ensure_future(create_server(config))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if starting.done():
        return starting.result()
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    return None
