"""Soak: hundreds of concurrent streams and unary calls against a real server, for a fixed time.

    python -m bench.soak --seconds 60 --streams 200 --unary-concurrency 50

Starts the sandbox (`python -m numbersvc sandbox`) and the server (`python -m numbersvc serve`,
pointed at the sandbox as if it were Plivo) as separate processes on ports the OS picks, with
`bench.bench`'s `start_sandbox` and `start_server` (their logs go to files in a temporary
directory), seeds `--groups` synthetic US toll-free groups, then for `--seconds` runs
`--streams` workers that each walk StreamNumberGroups over the whole toll-free filter, again and
again, and `--unary-concurrency` workers that alternate ListNumberGroups and GetNumberGroup.
It prints calls by RPC, errors by code, p50/p99 latency, and the server's RSS (VmRSS from
/proc/PID/status, sampled every second), and exits 1 on any error code at all (nothing is
faulted, so every call should succeed) or when the server logs an ERROR line or does not exit
0 on SIGTERM; 2 when the set-up fails.

The server runs with `NUMBERSVC_UPSTREAM_RATE=off` (the sandbox is not rate limited, and the
Plivo request budget would throttle the load by design), an in-memory ledger, metrics on a
port the OS picks, and text logs (always: the ERROR check reads text lines); pass
`--server-env NAME=VALUE` to change any other setting.
Calls still running when time is up are cancelled and counted as unfinished, not as errors.
`tests/e2e/test_soak.py` runs a short version of the same `soak()`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
import httpx
from google.rpc import error_details_pb2, status_pb2

from bench.bench import (
    Child,
    add_server_env,
    percentile,
    rss_bytes,
    server_env,
    start_sandbox,
    start_server,
)
from numbersvc.sandbox import SandboxControl
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

__all__ = ["Report", "SoakOptions", "main", "soak"]

STREAM: Final = "StreamNumberGroups"
LIST: Final = "ListNumberGroups"
GET: Final = "GetNumberGroup"
#: Codes the soak tolerates: none. Nothing is faulted, so every call must succeed.
EXPECTED_ERROR_CODES: Final[frozenset[grpc.StatusCode]] = frozenset()

_UNARY_TIMEOUT_SECONDS: Final = 10.0
_STREAM_SLACK_SECONDS: Final = 30.0  # a stream's deadline: the time left plus this
_RSS_INTERVAL_SECONDS: Final = 1.0
_CALLS_PER_CHANNEL: Final = 50  # concurrent calls sharing one HTTP/2 connection
_STREAM_FILTER: Final = pb.SearchFilter(region_code="US", number_type=pb.NUMBER_TYPE_TOLLFREE)
_LIST_FILTERS: Final = (
    pb.SearchFilter(region_code="US"),
    pb.SearchFilter(region_code="US", region="NY"),
    pb.SearchFilter(region_code="US", number_type=pb.NUMBER_TYPE_TOLLFREE),
    pb.SearchFilter(region_code="CA", services=[pb.NUMBER_SERVICE_SMS]),
    pb.SearchFilter(region_code="GB", number_type=pb.NUMBER_TYPE_NATIONAL),
    pb.SearchFilter(region_code="DE"),
)


@dataclass(frozen=True)
class SoakOptions:
    """How hard and how long to push."""

    seconds: float = 60.0
    streams: int = 200
    unary_concurrency: int = 50
    groups: int = 20_000  # synthetic toll-free groups seeded for the streams to walk
    server_env: Mapping[str, str] = field(default_factory=dict)
    seed: int = 7  # of the unary workers' choices


@dataclass
class LoadStats:
    """What the load saw. Latencies in seconds; a stream's is its whole walk."""

    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (rpc, code name)
    error_samples: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    unfinished: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    first_message: list[float] = field(default_factory=list)
    message_gaps: list[float] = field(default_factory=list)  # between a stream's messages
    stream_messages: int = 0
    stream_groups: int = 0

    def ok(self, rpc: str, seconds: float) -> None:
        self.calls[rpc] += 1
        self.latencies.setdefault(rpc, []).append(seconds)

    def failed(self, rpc: str, error: grpc.aio.AioRpcError) -> None:
        key = (rpc, error.code().name)
        self.errors[key] += 1
        samples = self.error_samples.setdefault(key, [])
        if len(samples) < 2:
            samples.append(f"{_reason(error)}: {error.details()}")

    @property
    def unexpected(self) -> Counter[tuple[str, str]]:
        allowed = {code.name for code in EXPECTED_ERROR_CODES}
        return Counter({key: n for key, n in self.errors.items() if key[1] not in allowed})


@dataclass
class Report:
    """Everything `soak` measured."""

    options: SoakOptions
    load: LoadStats
    rss_kib: list[int]  # the server's VmRSS, one sample a second
    walk_groups: int  # groups in the stream filter
    server_error_lines: list[str]
    server_exit_code: int | None

    @property
    def failures(self) -> list[str]:
        """Why the soak failed; empty when it passed."""
        found = [f"{n} x {rpc} {code}" for (rpc, code), n in self.load.unexpected.items()]
        found += [f"server logged: {line}" for line in self.server_error_lines[:5]]
        if self.server_exit_code != 0:
            found.append(f"server exit code {self.server_exit_code} after SIGTERM")
        return found


def _reason(error: grpc.aio.AioRpcError) -> str:
    """The `ErrorInfo` reason of a failed call, or a note that it carried none."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    if isinstance(raw, bytes):
        for packed in status_pb2.Status.FromString(raw).details:
            info = error_details_pb2.ErrorInfo()
            if packed.Unpack(info):
                return str(info.reason)
    return "no ErrorInfo (not numbersvc's own status)"


# --- Processes ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _sandbox(log_dir: Path) -> AsyncIterator[str]:
    """Run `numbersvc sandbox` on a port the OS picks; yield its URL; stop it (SIGINT)."""
    child, url = await start_sandbox(log_dir)  # stops the process itself if it fails to start
    try:
        yield url
    finally:
        await child.stop(signal.SIGINT)


@contextlib.asynccontextmanager
async def _server(
    sandbox_url: str, extra_env: Mapping[str, str], log_dir: Path
) -> AsyncIterator[tuple[Child, str]]:
    """Run `numbersvc serve` on the sandbox, rate budget off; yield it and its target; stop it."""
    # Text logs after the caller's settings: `Child.error_lines` reads levels from text lines.
    env = server_env(
        sandbox_url, rate_off=True, extra={**extra_env, "NUMBERSVC_LOG_FORMAT": "text"}
    )
    child, target = await start_server("server", env, log_dir)
    try:
        yield child, target
    finally:
        await child.stop()  # a no-op once the soak stopped it


def _rss_kib(pid: int) -> int | None:
    """Return the process's resident set size in KiB (VmRSS), or None if it is gone."""
    try:
        return rss_bytes(pid) // 1024
    except (OSError, RuntimeError):  # no /proc/PID, or no VmRSS (a zombie)
        return None


async def _sample_rss(pid: int, samples: list[int]) -> None:
    while True:
        rss = _rss_kib(pid)
        if rss is not None:
            samples.append(rss)
        await asyncio.sleep(_RSS_INTERVAL_SECONDS)


# --- Load ---------------------------------------------------------------------------------------


async def _walk(stub: pb_grpc.NumberGroupServiceAsyncStub, stats: LoadStats, end: float) -> None:
    """Walk the stream filter to its end, again and again, until `end`."""
    request = pb.StreamNumberGroupsRequest(filter=_STREAM_FILTER)
    while time.monotonic() < end:
        started = time.monotonic()
        timeout = end - started + _STREAM_SLACK_SECONDS
        call = stub.StreamNumberGroups(request, timeout=timeout)
        last: float | None = None
        try:
            async for message in call:
                now = time.monotonic()
                if last is None:
                    stats.first_message.append(now - started)
                else:
                    stats.message_gaps.append(now - last)
                last = now
                stats.stream_messages += 1
                stats.stream_groups += len(message.number_groups)
        except grpc.aio.AioRpcError as error:
            stats.failed(STREAM, error)
            continue
        except asyncio.CancelledError:
            stats.unfinished[STREAM] += 1
            call.cancel()
            raise
        stats.ok(STREAM, time.monotonic() - started)


async def _unary(
    stub: pb_grpc.NumberGroupServiceAsyncStub,
    stats: LoadStats,
    end: float,
    rng: random.Random,
    group_ids: Sequence[str],
) -> None:
    """Alternate (at random) one-page searches and gets of known groups until `end`."""
    while time.monotonic() < end:
        rpc = rng.choice((LIST, GET))
        started = time.monotonic()
        try:
            if rpc == LIST:
                filter_ = rng.choice(_LIST_FILTERS)
                request = pb.ListNumberGroupsRequest(filter=filter_, page_size=rng.randint(0, 20))
                await stub.ListNumberGroups(request, timeout=_UNARY_TIMEOUT_SECONDS)
            else:
                get = pb.GetNumberGroupRequest(group_id=rng.choice(group_ids))
                await stub.GetNumberGroup(get, timeout=_UNARY_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            stats.failed(rpc, error)
            continue
        except asyncio.CancelledError:
            stats.unfinished[rpc] += 1
            raise
        stats.ok(rpc, time.monotonic() - started)


async def run_load(
    target: str, options: SoakOptions, group_ids: Sequence[str], rss_pid: int | None = None
) -> tuple[LoadStats, list[int]]:
    """Run the workers against `target` for `options.seconds`, then cancel what is still running.

    Returns:
        The load's statistics and the RSS samples of `rss_pid` (KiB), first and last included.
    """
    stats = LoadStats()
    samples: list[int] = []
    workers = options.streams + options.unary_concurrency
    channels = [
        grpc.aio.insecure_channel(target) for _ in range(max(1, workers // _CALLS_PER_CHANNEL))
    ]
    stubs = [pb_grpc.NumberGroupServiceStub(channel) for channel in channels]
    sampler = None if rss_pid is None else asyncio.create_task(_sample_rss(rss_pid, samples))
    end = time.monotonic() + options.seconds
    tasks = [
        asyncio.create_task(_walk(stubs[i % len(stubs)], stats, end))
        for i in range(options.streams)
    ]
    tasks += [
        asyncio.create_task(
            _unary(stubs[i % len(stubs)], stats, end, random.Random(options.seed + i), group_ids)
        )
        for i in range(options.unary_concurrency)
    ]
    try:
        await asyncio.wait(tasks, timeout=options.seconds)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        for channel in channels:
            await channel.close()
    if rss_pid is not None and (last := _rss_kib(rss_pid)) is not None:
        samples.append(last)
    return stats, samples


async def _seed(sandbox_url: str, groups: int) -> None:
    """Add the synthetic toll-free groups the streams walk."""
    if groups:
        async with SandboxControl(sandbox_url, timeout_seconds=30.0) as control:
            await control.seed("US", number_type="tollfree", count=groups)


async def _prepare(target: str) -> tuple[list[str], int]:
    """Return group ids for the unary gets and the stream filter's total, via the server."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.NumberGroupServiceStub(channel)
        ids: list[str] = []
        total = 0
        for filter_ in (_STREAM_FILTER, pb.SearchFilter(region_code="US")):
            request = pb.ListNumberGroupsRequest(filter=filter_, page_size=20)
            page = await stub.ListNumberGroups(request, timeout=_UNARY_TIMEOUT_SECONDS)
            ids += [group.group_id for group in page.number_groups]
            total = total or page.total_size
    return ids, total


async def soak(options: SoakOptions) -> Report:
    """Start the sandbox and the server as processes, seed, load, measure, stop them."""
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        log_dir = Path(tmp)  # the processes' logs: the server's is read for ERROR lines
        async with _sandbox(log_dir) as sandbox_url:
            await _seed(sandbox_url, options.groups)
            async with _server(sandbox_url, options.server_env, log_dir) as (server, target):
                group_ids, walk_groups = await _prepare(target)
                load, rss = await run_load(target, options, group_ids, server.pid)
                errors_during_load = server.error_lines()
                exit_code = await server.stop()
    return Report(options, load, rss, walk_groups, errors_during_load, exit_code)


# --- Report -------------------------------------------------------------------------------------


def _ms(seconds: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of latencies in seconds, as milliseconds (0 when there are none)."""
    return percentile(seconds, fraction) * 1000 if seconds else 0.0


def _p50_p99(seconds: Sequence[float]) -> str:
    p50, p99 = (_ms(seconds, f) for f in (0.5, 0.99))
    return f"p50 {p50:.0f} ms, p99 {p99:.0f} ms"


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def render(report: Report) -> str:
    """The soak's summary, as printed."""
    o, load = report.options, report.load
    lines = [
        f"soak: {o.seconds:g} s, {o.streams} streams, {o.unary_concurrency} unary workers;"
        f" each stream walks {report.walk_groups:,} groups ({o.groups:,} seeded)",
        "",
        f"{'RPC':<20}{'CALLS':>8}{'ERRORS':>8}{'UNFINISHED':>12}{'P50 MS':>10}{'P99 MS':>10}",
    ]
    for rpc in (STREAM, LIST, GET):
        times = load.latencies.get(rpc, [])
        errors = sum(n for (name, _), n in load.errors.items() if name == rpc)
        lines.append(
            f"{rpc:<20}{load.calls[rpc]:>8}{errors:>8}{load.unfinished[rpc]:>12}"
            f"{_ms(times, 0.5):>10.0f}{_ms(times, 0.99):>10.0f}"
        )
    lines += [
        "(a stream call is one full walk; unfinished: still running when time was up)",
        f"stream messages {load.stream_messages:,} ({load.stream_groups:,} groups);"
        f" first message {_p50_p99(load.first_message)}; between messages"
        f" {_p50_p99(load.message_gaps)}",
    ]
    by_code: Counter[str] = Counter()
    for (_, code), n in load.errors.items():
        by_code[code] += n
    codes = ", ".join(f"{code} {n}" for code, n in by_code.most_common()) or "none"
    lines.append(f"errors by code: {codes}")
    for (rpc, code), samples in sorted(load.error_samples.items()):
        lines += [f"  {rpc} {code} {sample}" for sample in samples]
    rss = report.rss_kib
    if rss:
        lines.append(
            f"server RSS (VmRSS, {len(rss)} samples 1 s apart): start {_mib(rss[0])},"
            f" max {_mib(max(rss))}, end {_mib(rss[-1])}, growth {_mib(rss[-1] - rss[0])}"
        )
        trend = ", ".join(_mib(kib).removesuffix(" MiB") for kib in rss[::10])
        lines.append(f"  every 10 s (MiB): {trend}")
    else:
        lines.append("server RSS: no samples")
    lines.append(f"server ERROR log lines: {len(report.server_error_lines)}")
    lines.append(f"server exit code after SIGTERM: {report.server_exit_code}")
    failures = report.failures
    lines.append("result: " + ("FAIL: " + "; ".join(failures) if failures else "ok"))
    return "\n".join(lines)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run the soak, print the report; 0 ok, 1 failed, 2 set-up error."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=_seconds, default=60.0, help="load time")
    parser.add_argument("--streams", type=_count, default=200, help="stream workers")
    parser.add_argument("--unary-concurrency", type=_count, default=50, help="List/Get workers")
    parser.add_argument("--groups", type=_count, default=20_000, help="toll-free groups to seed")
    add_server_env(parser, "the server")
    args = parser.parse_args(argv)
    options = SoakOptions(
        seconds=args.seconds,
        streams=args.streams,
        unary_concurrency=args.unary_concurrency,
        groups=args.groups,
        server_env=dict(args.server_env),
    )
    print(
        f"soaking for {options.seconds:g} s: sandbox and server processes on 127.0.0.1...",
        file=sys.stderr,
        flush=True,
    )
    try:
        report = asyncio.run(soak(options))
    except (RuntimeError, OSError, TimeoutError, httpx.HTTPError, grpc.aio.AioRpcError) as exc:
        print(f"error: soak set-up failed: {exc}", file=sys.stderr)
        return 2
    print(render(report))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
