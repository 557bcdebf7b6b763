"""Prometheus metrics, served on their own HTTP port (`/metrics`).

`Metrics` owns one `CollectorRegistry` (injected in tests, so nothing global leaks between
servers) and is fed from three places: the interceptor (as a `CallObserver`: RPCs by method
and code, latency, streams in flight), the upstream client's response hook (requests by
operation and HTTP status, latency), and the services that retry, wait on the rate budget,
coalesce, cache and rent. Label values are fixed vocabularies (method names, status codes,
operations, cache results): never a request field, so no caller input or secret becomes a label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final, Generic, Protocol, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from numbersvc.interceptors import CallRecord
from numbersvc.ledger import Heartbeat, OrderState, PoolStats
from numbersvc.ledger.budget import BudgetSource, SharedBudget

__all__ = ["Metrics", "MetricsServer"]

# gRPC latency: from sub-millisecond unary calls to multi-second stream walks.
_RPC_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_UPSTREAM_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_M = TypeVar("_M", Counter, Gauge, Histogram)


class _Children(Generic[_M]):
    """A labelled metric's children, each looked up in prometheus_client once.

    `labels()` takes the metric's lock and validates its values on every call (~1.2 us); the
    per-call metrics ask for the same few children each time, so they are kept here. A child
    exists from its first use, as with `labels()`: the exported series are the same.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _M) -> None:
        self._metric: _M = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def __call__(self, *values: str) -> _M:
        child = self._children.get(values)
        if child is None:  # a race here makes `labels()` return the same child twice: harmless
            child = self._children[values] = self._metric.labels(*values)
        return child


class CountingLimiter(Protocol):
    """A rate limiter that counts what it did: `TokenBucket`, `SharedBudget`."""

    @property
    def waits(self) -> int:
        """Acquisitions that waited."""
        ...

    @property
    def waited_seconds_total(self) -> float:
        """Seconds they waited, summed."""
        ...

    @property
    def refusals(self) -> int:
        """Acquisitions refused: the wait exceeded their limit."""
        ...


class Metrics:
    """The service's metrics in one registry.

    Args:
        registry: where the metrics live; a new one by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "numbersvc_rpcs",
            "RPCs served, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "numbersvc_rpc_duration_seconds",
            "RPC latency, by method",
            ["method"],
            buckets=_RPC_BUCKETS,
            registry=r,
        )
        self.streams = Gauge(
            "numbersvc_streams_in_flight",
            "Server streams open now, by method",
            ["method"],
            registry=r,
        )
        self.upstream = Counter(
            "numbersvc_upstream_requests",
            "Upstream responses, by operation and HTTP status (or error kind)",
            ["operation", "status"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "numbersvc_upstream_duration_seconds",
            "Upstream request latency, by operation",
            ["operation"],
            buckets=_UPSTREAM_BUCKETS,
            registry=r,
        )
        self._rpc_count = _Children(self.rpcs)
        self._rpc_latency = _Children(self.rpc_seconds)
        self._streams_open = _Children(self.streams)
        self._upstream_count = _Children(self.upstream)
        self._upstream_latency = _Children(self.upstream_seconds)
        self.retries = Counter(
            "numbersvc_upstream_retries", "Read retries, by operation", ["operation"], registry=r
        )
        self.coalesced = Counter(
            "numbersvc_coalesced_calls", "Reads answered by an identical read in flight", registry=r
        )
        self.search_cache = Counter(
            "numbersvc_search_cache_requests",
            "Searches and gets looked up in the search cache, by result (hit, miss)",
            ["result"],
            registry=r,
        )
        for result in ("hit", "miss"):  # both series exist from the start, at 0
            self.search_cache.labels(result)
        self.search_cache_entries = Gauge(
            "numbersvc_search_cache_entries",
            "Answers in the search cache now (0 when NUMBERSVC_SEARCH_CACHE_SECONDS is 0)",
            registry=r,
        )
        self.rented = Counter(
            "numbersvc_numbers_rented",
            "Numbers in finished rent orders, by outcome",
            ["outcome"],
            registry=r,
        )
        self.store_up = Gauge(
            "numbersvc_store_up",
            "1 when this process's last ledger heartbeat reached the order ledger's store, 0"
            " when it could not (rents are refused with LEDGER_UNAVAILABLE meanwhile); a"
            " heartbeat that only met a lock reached it (see lease renewals), by store:"
            " sqlite or postgresql",
            ["store"],
            registry=r,
        )
        self.lease_renewals = Counter(
            "numbersvc_ledger_lease_renewals",
            "Renewals of this process's ledger lease (each heartbeat, every third of"
            " NUMBERSVC_INSTANCE_LEASE_SECONDS), by result: ok, or error (the store could not"
            " be reached: the lease was not renewed and nothing was recovered)",
            ["result"],
            registry=r,
        )
        for result in ("ok", "error"):  # both series exist from the start, at 0
            self.lease_renewals.labels(result)
        self.leases_expired = Counter(
            "numbersvc_ledger_leases_expired",
            "Other processes' ledger leases this process found lapsed and removed (a process"
            " gone without a clean exit, or cut from the store); each is counted by one process",
            registry=r,
        )
        self.orders_recovered = Counter(
            "numbersvc_orders_recovered",
            "Orders left sending past their send deadline, by a process proven gone or by this one"
            " (a claim it lost track of), made outcome_unknown here",
            registry=r,
        )
        self.answers_unrecorded = Counter(
            "numbersvc_rent_answers_unrecorded",
            "Plivo's answers to rent POSTs that no ledger row can hold: the order was claimed"
            " again while the POST was out (recovered and settled, or sent again). Each may be"
            " a rental the ledger does not show; the server's ERROR line 'is not recorded' has"
            " the answer",
            registry=r,
        )
        self.orders_outcome_unknown = Gauge(
            "numbersvc_orders_outcome_unknown",
            "Orders in the store waiting to be settled (outcome unknown), as this process's last"
            " good heartbeat counted them: replicas of one store export the same count",
            registry=r,
        )
        self.health_serving = Gauge(
            "numbersvc_health_serving",
            "1 while the gRPC health service says SERVING (ready), 0 once it says NOT_SERVING"
            " (the process is shutting down)",
            registry=r,
        )

    def order_finished(self, state: OrderState, numbers: int) -> None:
        """Count a finished rent order's numbers by outcome; one more order waits if unknown.

        The heartbeat's count replaces that guess within a third of a lease: an alert on the
        waiting orders need not wait for it.
        """
        self.rented.labels(state.value).inc(numbers)
        if state is OrderState.OUTCOME_UNKNOWN:
            self.orders_outcome_unknown.inc()

    def answer_unrecorded(self) -> None:
        """Count a rent's answer the ledger refused because the order was claimed again."""
        self.answers_unrecorded.inc()

    def heartbeat(self, store: str, found: Heartbeat | None, *, reached: bool = False) -> None:
        """Count one ledger heartbeat: what it `found`, or None when it failed.

        `reached`, for a failed one: the store answered all the same (it only met a lock).
        """
        self.store_up.labels(store).set(1 if found is not None or reached else 0)
        if found is None:
            self.lease_renewals.labels("error").inc()
            return
        self.lease_renewals.labels("ok").inc()
        self.leases_expired.inc(found.leases_expired)
        self.orders_recovered.inc(found.recovered)
        self.orders_outcome_unknown.set(found.outcome_unknown)

    def watch_pool(self, stats: Callable[[], PoolStats]) -> None:
        """Export the store's connection pool, read at scrape time."""
        self.registry.register(_PoolCollector(stats))

    def watch_rate_limiter(self, limiter: CountingLimiter) -> None:
        """Export the rate limiter's own counters: waits, seconds waited, refusals."""
        self.registry.register(_RateLimiterCollector(limiter))

    def watch_budget(self, budget: SharedBudget) -> None:
        """Export where the shared budget's permits come from, and how often it was lost."""
        self.registry.register(_BudgetCollector(budget))

    def call_started(self, record: CallRecord) -> None:
        """Count an open stream."""
        if record.streaming:
            self._streams_open(record.method).inc()

    def call_finished(self, record: CallRecord) -> None:
        """Count the RPC by method and code, and its latency."""
        self._rpc_count(record.method, record.code).inc()
        self._rpc_latency(record.method).observe(record.duration_seconds)
        if record.streaming:
            self._streams_open(record.method).dec()

    def upstream_response(self, operation: str, status: str, seconds: float) -> None:
        """Count one upstream response (or transport failure) and its latency."""
        self._upstream_count(operation, status).inc()
        self._upstream_latency(operation).observe(seconds)

    def render(self) -> bytes:
        """Return the registry in Prometheus' text format."""
        return generate_latest(self.registry)


class MetricsServer:
    """`/metrics` over HTTP on its own address, in the server's event loop.

    Args:
        metrics: what to serve.
        host: the address to bind.
        port: the port; 0 picks a free one (see `port` after `start`).
    """

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        """Bind and serve."""
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._requested_port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, request: web.Request) -> web.Response:
        del request
        body = self._metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _RateLimiterCollector(Collector):
    """Reads the limiter's counters at scrape time, so the hot path pays nothing."""

    def __init__(self, limiter: CountingLimiter) -> None:
        self._limiter = limiter

    def collect(self) -> Iterator[Metric]:
        bucket = self._limiter
        yield CounterMetricFamily(
            "numbersvc_rate_limiter_waits",
            "Upstream requests that waited for the budget",
            bucket.waits,
        )
        yield CounterMetricFamily(
            "numbersvc_rate_limiter_wait_seconds",
            "Seconds upstream requests waited for the budget",
            bucket.waited_seconds_total,
        )
        yield CounterMetricFamily(
            "numbersvc_rate_limiter_refusals",
            "Calls refused because the budget had no room within their deadline",
            bucket.refusals,
        )


class _BudgetCollector(Collector):
    """Reads the shared budget's source and outage count at scrape time."""

    def __init__(self, budget: SharedBudget) -> None:
        self._budget = budget

    def collect(self) -> Iterator[Metric]:
        source = GaugeMetricFamily(
            "numbersvc_rate_budget_source",
            "Where upstream permits come from: 1 for the source in use (shared: the store's"
            " account-wide budget; fallback: this process's local bucket)",
            labels=["source"],
        )
        for each in BudgetSource:
            source.add_metric([each.value], 1.0 if self._budget.source is each else 0.0)
        yield source
        yield CounterMetricFamily(
            "numbersvc_rate_budget_fallbacks",
            "Times the store's shared budget was lost and the local fallback taken (outages)",
            self._budget.fallbacks,
        )


class _PoolCollector(Collector):
    """Reads the store's connection pool at scrape time."""

    def __init__(self, stats: Callable[[], PoolStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        pool = self._stats()
        yield GaugeMetricFamily(
            "numbersvc_store_pool_connections_max",
            "Connections this process's store pool may open (NUMBERSVC_DATABASE_POOL_MAX);"
            " the database must allow this times the replicas",
            pool.max,
        )
        yield GaugeMetricFamily(
            "numbersvc_store_pool_connections_open",
            "Connections this process's store pool holds open now, in use or idle",
            pool.open,
        )
        yield GaugeMetricFamily(
            "numbersvc_store_pool_connections_in_use",
            "Connections of this process's store pool lent out now",
            pool.in_use,
        )
        yield GaugeMetricFamily(
            "numbersvc_store_pool_requests_waiting",
            "Calls waiting for a store connection now (every connection is in use)",
            pool.waiting,
        )
