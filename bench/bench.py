"""Benchmarks: numbersvc next to its baselines, measured side by side in one run, as ratios.

    python -m bench.bench [--quick] [--json PATH] [--server-env NAME=VALUE ...]

Starts, as separate processes on 127.0.0.1 (ports chosen by the OS): the sandbox
(`python -m numbersvc sandbox`), a bare grpc.aio echo server (`python -m bench.echo`) and the
server (`python -m numbersvc serve`, pointed at the sandbox as if it were Plivo, with its
shipped defaults). Rows 1-4 run against a server with the upstream rate budget off
(`NUMBERSVC_UPSTREAM_RATE=off`: the load would exceed Plivo's 60 requests/s by design); rows 5-6
against a second server with every default, the budget included. Both use an in-memory ledger,
metrics on a port the OS picks, `NUMBERSVC_DRAIN_SECONDS=0` (shutdown only) and the INFO access
log, written to a file (the bench does not read it while it measures).

The rows, each with its baseline in the same run (no figure is compared with another run's):

1. Unary latency, concurrency 1: ListNumberGroups through the service vs the lean facade
   (`python -m bench.facade`: one grpc.aio handler making the same GET with aiohttp), as
   ratios of p50 and p99 (issue 11: at most 1.25x and 1.4x); beside them, the same REST call
   (the URL the service sent, captured from the sandbox's request log) made directly with
   aiohttp and a bare grpc.aio echo round trip. The four interleaved in a rotating order.
2. Throughput at concurrency 32: the service vs direct aiohttp REST, in alternating phases of
   equal length (calls per second; the rounds alternate which side goes first). Every worker
   asks for its own pages, so no two identical reads are ever in flight together and
   coalescing cannot flatter the service.
3. Full walk of 1,000 groups (50 pages of 20, a filter seeded for it) with 25 ms injected
   upstream latency: StreamNumberGroups vs walking the same pages one after another by offset
   with aiohttp, as the official SDKs do. Medians of alternating walks.
4. Memory: the server's VmRSS before and during (peak, sampled and VmHWM) and after a stream
   walking 100,000 groups (20,000 with --quick).
5. Coalescing: 200 concurrent identical ListNumberGroups calls with 0.5 s upstream latency;
   upstream requests counted from the sandbox's request log.
6. CPU per call at concurrency 32: the server process's utime+stime (/proc/PID/stat) per
   ListNumberGroups call against its floor, the echo server's per echo call plus the shipped
   upstream client's (`PlivoClient`, in the bench's process) per search of the same page, in
   alternating phases sized to stay within the rate budget; target at most 1.5x (issue 11).
7. The account-wide budget's cost per upstream request, concurrency 1, in this process: a
   permit from the shared budget on a SQLite ledger file and on PostgreSQL (a throwaway
   cluster) vs from a local token bucket, interleaved (`bench/budget.py`). p99, target 1 ms.
8. The search cache: a skewed load (each call's filter drawn from a Zipf law over 300 filters,
   64 callers on 8 channels) against a server with `NUMBERSVC_SEARCH_CACHE_SECONDS=2` and one
   with the cache off (both with the rate budget off), in alternating phases of equal length:
   upstream requests per served call (from the sandbox's request log) and latency.
9-11. Replicas on one PostgreSQL database (a throwaway cluster) beside their one-store
   baselines: a rent vs on SQLite, reads of two replicas sharing the budget vs one with a local
   bucket, a duplicate's wait by polling vs LISTEN/NOTIFY (`bench/replicas.py`).
12. Tracing: server CPU per ListNumberGroups call exporting every span over OTLP to a real
    receiver process vs tracing off, alternating phases, as a ratio (`bench/tracing.py`).

Prints one table and writes the figures as JSON (`bench/results/latest.json` by default). Exit
0 when every row was measured, met or not (the table says which); 2 when the set-up or a
measurement failed (every call must succeed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import aiohttp
import grpc
import httpx

from bench import budget
from bench.echo import ECHO_METHOD
from bench.facade import FACADE_METHOD
from numbersvc.config import Config
from numbersvc.sandbox import DEFAULT_AUTH_ID, DEFAULT_AUTH_TOKEN, SandboxControl
from numbersvc.sandbox.journal import DEFAULT_MAX_RECORDS
from numbersvc.upstream import PlivoClient
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

__all__ = [
    "FULL",
    "QUICK",
    "Bench",
    "Plan",
    "main",
    "run_bench",
    "seed_unary",
]

ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_JSON: Final = ROOT / "bench" / "results" / "latest.json"

PAGE_SIZE: Final = 20
CALL_TIMEOUT_SECONDS: Final = 10.0
STREAM_TIMEOUT_SECONDS: Final = 600.0
CONCURRENCY: Final = 32
#: Rows 1, 2 and 6 read the pages of US local groups, seeded up to this many (100 pages).
UNARY_GROUPS: Final = 2_000
UNARY_FILTER: Final = pb.SearchFilter(region_code="US", number_type=pb.NUMBER_TYPE_LOCAL)
#: Row 3 walks a filter of its own: toll-free numbers under a prefix no fixture uses.
WALK_GROUPS: Final = 1_000
WALK_PREFIX: Final = "822"
WALK_FILTER: Final = pb.SearchFilter(
    region_code="US", number_type=pb.NUMBER_TYPE_TOLLFREE, prefix=WALK_PREFIX
)
WALK_LATENCY_SECONDS: Final = 0.025
#: Row 4 walks a bucket without further filters, so the sandbox pages it by slicing.
MEMORY_FILTER: Final = pb.SearchFilter(region_code="CA", number_type=pb.NUMBER_TYPE_TOLLFREE)
MEMORY_TARGET_BYTES: Final = 30_000_000
RSS_INTERVAL_SECONDS: Final = 0.05
COALESCE_FILTER: Final = pb.SearchFilter(region_code="GB", number_type=pb.NUMBER_TYPE_LOCAL)
COALESCE_CALLS: Final = 200
COALESCE_LATENCY_SECONDS: Final = 0.5
CALLS_PER_CHANNEL: Final = 50
#: Row 6: the budget is 300 requests per 5 s (60/s); this refills a phase's calls and more.
CPU_REFILL_SECONDS: Final = 4.0
#: Row 8: DE local groups under 300 prefixes of their own, one page each; filter k is drawn
#: with probability proportional to 1 / k**ZIPF_EXPONENT.
ZIPF_FILTERS: Final = 300
ZIPF_EXPONENT: Final = 1.0
ZIPF_PREFIXES: Final = tuple(str(90_000 + k) for k in range(ZIPF_FILTERS))
ZIPF_CALLERS: Final = 64
ZIPF_CHANNELS: Final = 8
ZIPF_CACHE_SECONDS: Final = "2"
ZIPF_TARGET: Final = 0.2
#: Row 1: the service's p50 and p99 at most these multiples of the lean facade's (issue 11).
UNARY_TARGETS: Final = {"p50": 1.25, "p99": 1.4}
#: Row 6: the server's CPU per call at most this multiple of echo's + the HTTP client's.
CPU_TARGET: Final = 1.5

_START_TIMEOUT_SECONDS: Final = 60.0
_STOP_TIMEOUT_SECONDS: Final = 30.0
_SERVING: Final = re.compile(r"serving on 127\.0\.0\.1:(\d+)")
_SANDBOX_URL: Final = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
_METRICS_URL: Final = re.compile(r"metrics on (http://127\.0\.0\.1:\d+/metrics)")
_VMRSS: Final = re.compile(r"^VmRSS:\s+(\d+)\s+kB", re.MULTILINE)
_VMHWM: Final = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    """How many iterations each row gets."""

    mode: str
    warmup_calls: int = 300  # per side, before rows 1 and 2 (and 6)
    unary_calls: int = 5_000  # row 1: calls per side, concurrency 1
    throughput_rounds: int = 4  # row 2: rounds of one service and one direct phase
    throughput_seconds: float = 6.0  # row 2: length of a phase
    walk_reps: int = 7  # row 3: walks per side
    memory_groups: int = 100_000  # row 4
    coalesce_rounds: int = 3  # row 5
    cpu_rounds: int = 5  # row 6: rounds of one service and one echo phase
    cpu_calls: int = 200  # row 6: calls per phase, within the rate budget's burst
    budget_requests: int = 2_000  # row 7: permits per limiter
    zipf_rounds: int = 3  # row 8: rounds of one phase without the cache and one with it
    zipf_seconds: float = 5.0  # row 8: length of a phase
    rows: frozenset[int] = frozenset(range(1, 13))  # which rows to run


FULL: Final = Plan("full")
QUICK: Final = Plan(
    "quick",
    warmup_calls=100,
    unary_calls=1_000,
    throughput_rounds=2,
    throughput_seconds=4.0,
    walk_reps=3,
    memory_groups=20_000,
    coalesce_rounds=2,
    cpu_rounds=3,
    budget_requests=500,
    zipf_rounds=2,
    zipf_seconds=3.0,
)


# --- Processes ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """Return the process's CPU time (utime + stime, all threads) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    # After the command: state is field 3, utime 14 and stime 15 (1-based), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _status_kib(pid: int, pattern: re.Pattern[str]) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        match = pattern.search(status.read())
    if match is None:
        raise RuntimeError(f"/proc/{pid}/status has no {pattern.pattern}")
    return int(match.group(1))


def rss_bytes(pid: int) -> int:
    """Return the process's resident set size (VmRSS) in bytes."""
    return 1024 * _status_kib(pid, _VMRSS)


def _reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux 4.0+); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PLIVO_", "NUMBERSVC_"))}
    return {**clean, **extra}


def child_import_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with ROOT after any PYTHONPATH it has: what a child runs `-m bench...` with."""
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join([*path, str(ROOT)])}


def _open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")  # the child writes to it; the caller closes it once it started


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


class Child:
    """A child process whose stdout and stderr go to a log file, read back to find its address.

    The log is a file rather than a pipe so that the bench never spends CPU draining the
    server's access log while it measures.
    """

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path):
        self.name = name
        self.argv = tuple(argv)
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    @property
    def process(self) -> asyncio.subprocess.Process:
        """The running process."""
        if self._process is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._process

    def log(self) -> str:
        """Everything the process wrote so far."""
        return _read_text(self.log_path) if self.log_path.exists() else ""

    def tail(self, lines: int = 20) -> str:
        """The last lines of its log."""
        return "\n".join(self.log().splitlines()[-lines:])

    async def start(self, ready: re.Pattern[str]) -> str:
        """Start the process and wait for `ready` in its log; return the pattern's group 1."""
        log = _open_log(self.log_path)
        # NOTE: not run from ROOT: `python -m` puts its working directory first on sys.path,
        # before PYTHONPATH, so a copy of numbersvc given in PYTHONPATH (`bench.ab --b
        # PYTHONPATH=DIR`) was silently ignored and "A/B" measured A twice. ROOT comes last.
        env = child_import_env(self.env)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self.argv,
                env=env,
                cwd=self.log_path.parent,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        end = time.monotonic() + _START_TIMEOUT_SECONDS
        try:
            while time.monotonic() < end:
                if (match := ready.search(self.log())) is not None:
                    return match.group(1)
                if self.process.returncode is not None:
                    break
                await asyncio.sleep(0.05)
        except BaseException:  # Ctrl-C while waiting: the caller never gets it to stop it
            await self.stop()
            raise
        await self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Signal the process and wait for it; kill it if it does not exit in time."""
        process = self._process
        if process is None:
            return None
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            try:
                await asyncio.wait_for(process.wait(), _STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()
                return None
        return process.returncode

    def error_lines(self) -> list[str]:
        """Log lines at ERROR or CRITICAL (text format: date, time, LEVEL, ...)."""
        found = []
        for line in self.log().splitlines():
            fields = line.split(" ", 3)
            if len(fields) > 2 and fields[2] in ("ERROR", "CRITICAL"):
                found.append(line)
        return found


def server_env(sandbox_url: str, *, rate_off: bool, extra: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: Plivo at the sandbox, shipped defaults otherwise."""
    env = {
        "NUMBERSVC_UPSTREAM": "plivo",
        "PLIVO_BASE_URL": sandbox_url,
        "PLIVO_AUTH_ID": DEFAULT_AUTH_ID,
        "PLIVO_AUTH_TOKEN": DEFAULT_AUTH_TOKEN,
        "NUMBERSVC_LEDGER_PATH": ":memory:",
        "NUMBERSVC_METRICS_LISTEN": "127.0.0.1:0",  # its default is a fixed port
        "NUMBERSVC_DRAIN_SECONDS": "0",  # shutdown only: nothing measured depends on it
    }
    if rate_off:
        env["NUMBERSVC_UPSTREAM_RATE"] = "off"
    return _child_env({**env, **extra})


async def start_sandbox(log_dir: Path) -> tuple[Child, str]:
    """Start `numbersvc sandbox` on a port the OS picks; return it and its base URL."""
    argv = (sys.executable, "-m", "numbersvc", "sandbox", "--listen", "127.0.0.1:0")
    child = Child("sandbox", argv, _child_env({}), log_dir)
    url = await child.start(_SANDBOX_URL)
    return child, url


async def start_server(name: str, env: Mapping[str, str], log_dir: Path) -> tuple[Child, str]:
    """Start `numbersvc serve` on a port the OS picks; return it and its gRPC target."""
    argv = (sys.executable, "-m", "numbersvc", "serve", "--listen", "127.0.0.1:0")
    child = Child(name, argv, env, log_dir)
    port = await child.start(_SERVING)
    return child, f"127.0.0.1:{port}"


async def start_echo(log_dir: Path) -> tuple[Child, str]:
    """Start the bare echo server on a port the OS picks; return it and its target."""
    argv = (sys.executable, "-m", "bench.echo", "--listen", "127.0.0.1:0")
    child = Child("echo", argv, _child_env({}), log_dir)
    port = await child.start(_SERVING)
    return child, f"127.0.0.1:{port}"


async def start_facade(log_dir: Path, sandbox_url: str) -> tuple[Child, str]:
    """Start the lean facade (row 1's baseline) on the sandbox; return it and its target."""
    argv = [sys.executable, "-m", "bench.facade", "--listen", "127.0.0.1:0"]
    argv += ["--upstream", sandbox_url, "--auth-id", DEFAULT_AUTH_ID]
    argv += ["--auth-token", DEFAULT_AUTH_TOKEN]
    child = Child("facade", argv, _child_env({}), log_dir)
    port = await child.start(_SERVING)
    return child, f"127.0.0.1:{port}"


# --- Clients ------------------------------------------------------------------------------------


class Direct:
    """A plain aiohttp client of the sandbox's REST API: what a caller without numbersvc does."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        basic = base64.b64encode(f"{DEFAULT_AUTH_ID}:{DEFAULT_AUTH_TOKEN}".encode()).decode()
        self._session = aiohttp.ClientSession(
            headers={"Accept": "application/json", "Authorization": f"Basic {basic}"}
        )

    async def get(self, url: str) -> dict[str, Any]:
        """GET `url` and decode its JSON object; raise on anything but a 200."""
        async with self._session.get(url) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"direct GET {url}: HTTP {response.status}: {body[:200]!r}")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise RuntimeError(f"direct GET {url}: not a JSON object")
        return data

    async def text(self, url: str) -> str:
        """GET `url` without credentials checks and return its body as text."""
        async with self._session.get(url) as response:
            return await response.text()

    async def aclose(self) -> None:
        """Close the session and its connections."""
        await self._session.close()


def _url(base_url: str, path: str, query: Mapping[str, str]) -> str:
    return f"{base_url}{path}?{urllib.parse.urlencode(query)}"


async def logged_searches(
    control: SandboxControl, base_url: str
) -> list[tuple[dict[str, str], str]]:
    """The search requests the sandbox logged since its log was cleared: (query, full URL)."""
    return [
        (dict(record["query"]), _url(base_url, record["path"], record["query"]))
        for record in await control.requests()
        if record["operation"] == "search"
    ]


@dataclass(frozen=True)
class Pages:
    """The pages of one filter, both ways: the service's page tokens and the REST URLs.

    `tokens[i]` asks the service for the page at offset `i * PAGE_SIZE`; `urls[i]` is the REST
    URL the service sent upstream for that same page.
    """

    tokens: list[str]
    urls: list[str]
    requests: list[bytes]  # the serialized ListNumberGroupsRequest of each page (echo payload)

    def __len__(self) -> int:
        return len(self.tokens)


async def collect_pages(
    stub: pb_grpc.NumberGroupServiceAsyncStub,
    control: SandboxControl,
    base_url: str,
    search: pb.SearchFilter,
) -> Pages:
    """Walk `search` with ListNumberGroups, keeping each page's token and upstream URL."""
    await control.clear_requests()
    tokens: list[str] = []
    token = ""
    while True:
        tokens.append(token)
        request = pb.ListNumberGroupsRequest(filter=search, page_size=PAGE_SIZE, page_token=token)
        page = await stub.ListNumberGroups(request, timeout=CALL_TIMEOUT_SECONDS)
        if len(page.number_groups) != PAGE_SIZE:
            raise RuntimeError(f"page {len(tokens)} has {len(page.number_groups)} groups")
        token = page.next_page_token
        if not token:
            break
    by_offset = {
        int(query["offset"]): url for query, url in await logged_searches(control, base_url)
    }
    urls = [by_offset[i * PAGE_SIZE] for i in range(len(tokens))]
    requests = [
        pb.ListNumberGroupsRequest(
            filter=search, page_size=PAGE_SIZE, page_token=t
        ).SerializeToString()
        for t in tokens
    ]
    return Pages(tokens, urls, requests)


Call = Callable[[int], Awaitable[None]]
"""One timed call: it takes a page index."""


def list_call(
    stub: pb_grpc.NumberGroupServiceAsyncStub, pages: Pages, search: pb.SearchFilter
) -> Call:
    """A ListNumberGroups call for a page, through the service."""
    requests = [
        pb.ListNumberGroupsRequest(filter=search, page_size=PAGE_SIZE, page_token=token)
        for token in pages.tokens
    ]

    async def call(page: int) -> None:
        response = await stub.ListNumberGroups(requests[page], timeout=CALL_TIMEOUT_SECONDS)
        if len(response.number_groups) != PAGE_SIZE:
            raise RuntimeError(f"service page {page}: {len(response.number_groups)} groups")

    return call


def direct_call(get: Callable[[str], Awaitable[dict[str, Any]]], urls: Sequence[str]) -> Call:
    """A page's REST call made with `get` (such as `Direct.get`: aiohttp, JSON decoded)."""

    async def call(page: int) -> None:
        data = await get(urls[page])
        if len(data["objects"]) != PAGE_SIZE:
            raise RuntimeError(f"direct page {page}: {len(data['objects'])} groups")

    return call


def echo_call(echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], pages: Pages) -> Call:
    """A bare grpc.aio round trip carrying the page's ListNumberGroupsRequest bytes."""

    async def call(page: int) -> None:
        payload = pages.requests[page]
        if await echo(payload, timeout=CALL_TIMEOUT_SECONDS) != payload:
            raise RuntimeError("the echo server answered something else")

    return call


def facade_call(channel: grpc.aio.Channel, pages: Pages, base_url: str) -> Call:
    """The lean facade's call for a page: the page's REST path and query, the body back."""
    get: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(FACADE_METHOD)
    paths = [url.removeprefix(base_url).encode() for url in pages.urls]

    async def call(page: int) -> None:
        # The facade decoded it; decoding it again here would count against the facade.
        if not (await get(paths[page], timeout=CALL_TIMEOUT_SECONDS)).startswith(b"{"):
            raise RuntimeError(f"facade page {page}: not a JSON object")

    return call


def echo_stub(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """The echo method, bytes in and out (no serializers)."""
    return channel.unary_unary(ECHO_METHOD)


# --- Statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of `values`."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, mean and max of latencies in seconds, as milliseconds."""
    return {
        "p50": 1000 * percentile(seconds, 0.50),
        "p90": 1000 * percentile(seconds, 0.90),
        "p99": 1000 * percentile(seconds, 0.99),
        "mean": 1000 * statistics.fmean(seconds),
        "max": 1000 * max(seconds),
        "n": len(seconds),
    }


@dataclass
class Phase:
    """One load phase: calls made, wall time, latencies, CPU seconds per watched process."""

    calls: int
    seconds: float
    latencies: list[float]
    cpu: dict[str, float]

    @property
    def rate(self) -> float:
        """Calls per second."""
        return self.calls / self.seconds


def rate(phases: Sequence[Phase]) -> float:
    """Calls per second over all of `phases`."""
    return sum(p.calls for p in phases) / sum(p.seconds for p in phases)


def cpu_ms_per_call(phases: Sequence[Phase], name: str) -> float:
    """Milliseconds of process `name`'s CPU per call, over all of `phases`."""
    return 1000 * sum(p.cpu[name] for p in phases) / sum(p.calls for p in phases)


def latency_ms(phases: Sequence[Phase]) -> dict[str, float]:
    """`summary_ms` of every call in `phases`."""
    return summary_ms([t for p in phases for t in p.latencies])


def _cpu(pids: Mapping[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


async def run_phase(
    call: Call,
    assignments: Sequence[Sequence[int]],
    total: int,
    pids: Mapping[str, int],
    *,
    seconds: float | None = None,
) -> Phase:
    """Make calls with one worker per assignment, each cycling through its own pages.

    Stops issuing after `total` calls or, when `seconds` is given, after that long (whichever
    comes first); calls in flight then finish and count.
    """
    latencies: list[float] = []
    issued = 0
    end = math.inf if seconds is None else time.perf_counter() + seconds

    async def worker(pages: Sequence[int]) -> None:
        nonlocal issued
        turn = 0
        while issued < total and time.perf_counter() < end:
            issued += 1
            page = pages[turn % len(pages)]
            turn += 1
            started = time.perf_counter()
            await call(page)
            latencies.append(time.perf_counter() - started)

    before = _cpu(pids)
    started = time.perf_counter()
    await asyncio.gather(*(worker(pages) for pages in assignments))
    elapsed = time.perf_counter() - started
    after = _cpu(pids)
    return Phase(issued, elapsed, latencies, {k: after[k] - before[k] for k in pids})


def disjoint_assignments(pages: int, workers: int) -> list[list[int]]:
    """Give each worker its own pages, so no two workers ever ask for the same one."""
    if pages < workers:
        raise ValueError(f"{pages} pages cannot keep {workers} workers apart")
    return [list(range(w, pages, workers)) for w in range(workers)]


# --- Rows ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table."""

    row: str
    baseline: str
    figure: str
    ratio: str
    target: str
    met: bool | None  # None: reported, no target


@dataclass
class Bench:
    """Everything one run measured."""

    plan: Plan
    server_env: dict[str, str]
    machine: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: str = ""
    seconds: float = 0.0


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def _yes(met: bool | None) -> str:
    return "-" if met is None else "yes" if met else "NO"


async def row_unary(
    bench: Bench, service: Call, direct: Call, echo: Call, facade: Call, pages: int
) -> None:
    """Row 1: concurrency 1, the four calls interleaved in a rotating order."""
    calls = (service, direct, echo, facade)
    times: tuple[list[float], ...] = tuple([] for _ in calls)
    for warm in range(bench.plan.warmup_calls):
        for call in calls:
            await call(warm % pages)
    for i in range(bench.plan.unary_calls):
        for k in range(len(calls)):
            which = (i + k) % len(calls)
            started = time.perf_counter()
            await calls[which](i % pages)
            times[which].append(time.perf_counter() - started)
    svc, dct, ech, fac = (summary_ms(t) for t in times)
    overhead = {q: svc[q] - dct[q] for q in ("p50", "p99")}
    bench.figures["1_unary"] = {
        "concurrency": 1,
        "calls_per_side": bench.plan.unary_calls,
        "warmup_calls_per_side": bench.plan.warmup_calls,
        "service_ms": svc,
        "facade_ms": fac,
        "direct_ms": dct,
        "echo_ms": ech,
        "overhead_ms": overhead,
        "service_over_facade": {q: svc[q] / fac[q] for q in ("p50", "p99")},
        "target_service_over_facade": UNARY_TARGETS,
    }
    for q, target in UNARY_TARGETS.items():
        bench.rows.append(
            Row(
                f"1 unary {q}, c=1 (vs lean facade)",
                f"facade {_ms(fac[q])}",
                f"service {_ms(svc[q])}",
                f"{svc[q] / fac[q]:.2f}x",
                f"<= {target:.2f}x facade",
                svc[q] / fac[q] <= target,
            )
        )
    bench.rows.append(
        Row(
            "1 floors, c=1 (p50, p99)",
            f"direct {dct['p50']:.2f}, {_ms(dct['p99'])}",
            f"echo {ech['p50']:.2f}, {_ms(ech['p99'])}",
            f"{svc['p50'] / dct['p50']:.2f}x",
            "(reported: service/direct)",
            None,
        )
    )


async def row_throughput(
    bench: Bench, service: Call, direct: Call, pages: int, pids: Mapping[str, int]
) -> None:
    """Row 2: concurrency 32, alternating phases of equal length, service and direct."""
    plan = bench.plan
    assignments = disjoint_assignments(pages, CONCURRENCY)
    for call in (service, direct):  # warm the connection pools at this concurrency
        await run_phase(call, assignments, plan.warmup_calls, pids)
    svc_phases: list[Phase] = []
    dct_phases: list[Phase] = []
    for r in range(plan.throughput_rounds):
        order = ((service, svc_phases), (direct, dct_phases))
        for call, phases in order if r % 2 == 0 else reversed(order):
            phases.append(
                await run_phase(call, assignments, 10**9, pids, seconds=plan.throughput_seconds)
            )
    svc_rate, dct_rate = rate(svc_phases), rate(dct_phases)
    svc_lat, dct_lat = latency_ms(svc_phases), latency_ms(dct_phases)

    ratio = svc_rate / dct_rate
    tail = svc_lat["p99"] / svc_lat["p50"]
    bench.figures["2_throughput"] = {
        "concurrency": CONCURRENCY,
        "rounds": plan.throughput_rounds,
        "seconds_per_phase": plan.throughput_seconds,
        "service_calls": sum(p.calls for p in svc_phases),
        "direct_calls": sum(p.calls for p in dct_phases),
        "service_round_calls_per_second": [p.rate for p in svc_phases],
        "direct_round_calls_per_second": [p.rate for p in dct_phases],
        "service_calls_per_second": svc_rate,
        "direct_calls_per_second": dct_rate,
        "ratio": ratio,
        "round_ratios": [s.rate / d.rate for s, d in zip(svc_phases, dct_phases, strict=True)],
        "service_ms": svc_lat,
        "direct_ms": dct_lat,
        "service_p99_over_p50": tail,
        "cpu_ms_per_call": {
            "service_phases": {name: cpu_ms_per_call(svc_phases, name) for name in pids},
            "direct_phases": {name: cpu_ms_per_call(dct_phases, name) for name in pids},
        },
    }
    bench.rows.append(
        Row(
            "2 throughput, c=32",
            f"direct {dct_rate:,.0f} calls/s",
            f"service {svc_rate:,.0f} calls/s",
            f"{ratio:.2f}x",
            ">= 0.45x direct",
            ratio >= 0.45,
        )
    )
    bench.rows.append(
        Row(
            "2 service tail, c=32",
            f"p50 {_ms(svc_lat['p50'])}",
            f"p99 {_ms(svc_lat['p99'])}",
            f"{tail:.2f}x",
            "p99 < 3x p50",
            tail < 3.0,
        )
    )


async def _walk_stream(
    stub: pb_grpc.NumberGroupServiceAsyncStub, request: pb.StreamNumberGroupsRequest
) -> tuple[float, int]:
    started = time.perf_counter()
    groups = 0
    async for message in stub.StreamNumberGroups(request, timeout=STREAM_TIMEOUT_SECONDS):
        groups += len(message.number_groups)
    return time.perf_counter() - started, groups


async def _walk_sequential(direct: Direct, first_url: str) -> tuple[float, int]:
    """Walk page after page by offset, as the official SDKs do: offset += limit until the end."""
    base, _, query_text = first_url.partition("?")
    query = dict(urllib.parse.parse_qsl(query_text))
    started = time.perf_counter()
    groups = offset = 0
    while True:
        query["offset"] = str(offset)
        data = await direct.get(f"{base}?{urllib.parse.urlencode(query)}")
        groups += len(data["objects"])
        if not data["meta"]["next"]:
            return time.perf_counter() - started, groups
        offset += int(data["meta"]["limit"])


async def row_walk(
    bench: Bench,
    stub: pb_grpc.NumberGroupServiceAsyncStub,
    direct: Direct,
    control: SandboxControl,
) -> None:
    """Row 3: 1,000 groups with 25 ms upstream latency, stream vs sequential offsets."""
    request = pb.StreamNumberGroupsRequest(filter=WALK_FILTER, page_size=PAGE_SIZE)
    await control.clear_requests()
    await control.set_latency(WALK_LATENCY_SECONDS)
    try:
        await _walk_stream(stub, request)  # warm-up, and the URL it sends for the first page
        first = next(
            url
            for query, url in await logged_searches(control, direct.base_url)
            if query["offset"] == "0"
        )
        await _walk_sequential(direct, first)
        stream: list[float] = []
        sequential: list[float] = []
        counts: set[int] = set()
        walks: list[tuple[list[float], Callable[[], Awaitable[tuple[float, int]]]]] = [
            (stream, lambda: _walk_stream(stub, request)),
            (sequential, lambda: _walk_sequential(direct, first)),
        ]
        for r in range(bench.plan.walk_reps):
            for times, walk in walks if r % 2 == 0 else reversed(walks):
                seconds, groups = await walk()
                times.append(seconds)
                counts.add(groups)
    finally:
        await control.set_latency(0.0)
    if counts != {WALK_GROUPS}:
        raise RuntimeError(f"row 3 walks saw {sorted(counts)} groups, expected {WALK_GROUPS}")
    svc, seq = statistics.median(stream), statistics.median(sequential)
    ratio = svc / seq
    bench.figures["3_walk"] = {
        "groups": WALK_GROUPS,
        "pages": WALK_GROUPS // PAGE_SIZE,
        "upstream_latency_ms": 1000 * WALK_LATENCY_SECONDS,
        "reps_per_side": bench.plan.walk_reps,
        "stream_seconds": stream,
        "sequential_seconds": sequential,
        "stream_median_seconds": svc,
        "sequential_median_seconds": seq,
        "ratio": ratio,
    }
    bench.rows.append(
        Row(
            "3 walk 1,000 groups, 25 ms",
            f"sequential {1000 * seq:,.0f} ms",
            f"stream {1000 * svc:,.0f} ms",
            f"{ratio:.3f}x",
            "<= 0.15x sequential",
            ratio <= 0.15,
        )
    )


async def _sample_rss(pid: int, samples: list[int]) -> None:
    while True:
        samples.append(rss_bytes(pid))
        await asyncio.sleep(RSS_INTERVAL_SECONDS)


async def row_memory(bench: Bench, stub: pb_grpc.NumberGroupServiceAsyncStub, pid: int) -> None:
    """Row 4: the server's RSS while one stream walks `memory_groups` groups."""
    groups = bench.plan.memory_groups
    request = pb.StreamNumberGroupsRequest(
        filter=MEMORY_FILTER, page_size=PAGE_SIZE, max_results=groups
    )
    await asyncio.sleep(1.0)  # let the earlier rows' garbage settle
    before = rss_bytes(pid)
    hwm_reset = _reset_peak_rss(pid)
    samples: list[int] = [before]
    sampler = asyncio.create_task(_sample_rss(pid, samples))
    try:
        seconds, walked = await _walk_stream(stub, request)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    end = rss_bytes(pid)
    peak = max(*samples, end)
    if hwm_reset:
        peak = max(peak, 1024 * _status_kib(pid, _VMHWM))
    if walked != groups:
        raise RuntimeError(f"row 4 walked {walked} groups, expected {groups}")
    growth = peak - before
    bench.figures["4_memory"] = {
        "groups": walked,
        "seconds": seconds,
        "groups_per_second": walked / seconds,
        "rss_before_bytes": before,
        "rss_peak_bytes": peak,
        "rss_end_bytes": end,
        "growth_bytes": growth,
        "samples": len(samples),
        "peak_includes_vmhwm": hwm_reset,
        "target_growth_bytes": MEMORY_TARGET_BYTES,
    }
    bench.rows.append(
        Row(
            f"4 RSS, stream of {walked:,} groups",
            f"before {before / 1e6:.1f} MB",
            f"+{growth / 1e6:.1f} MB (peak {peak / 1e6:.1f})",
            f"{peak / before:.2f}x",
            "growth <= 30 MB",
            growth <= MEMORY_TARGET_BYTES,
        )
    )


async def _metric(direct: Direct, url: str, name: str) -> float:
    text = await direct.text(url)
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _list_bytes(
    stub: pb_grpc.NumberGroupServiceAsyncStub,
    request: pb.ListNumberGroupsRequest,
    issued: list[float],
) -> bytes:
    issued.append(time.perf_counter())
    reply = await stub.ListNumberGroups(request, timeout=CALL_TIMEOUT_SECONDS)
    return reply.SerializeToString()


async def row_coalesce(
    bench: Bench,
    stubs: Sequence[pb_grpc.NumberGroupServiceAsyncStub],
    control: SandboxControl,
    direct: Direct,
    metrics_url: str,
) -> None:
    """Row 5: 200 identical concurrent ListNumberGroups calls; upstream requests they cost."""
    request = pb.ListNumberGroupsRequest(filter=COALESCE_FILTER, page_size=PAGE_SIZE)
    counts: list[int] = []
    spreads: list[float] = []
    walls: list[float] = []
    identical = True
    coalesced_before = await _metric(direct, metrics_url, "numbersvc_coalesced_calls_total")
    await control.set_latency(COALESCE_LATENCY_SECONDS)
    try:
        for _ in range(bench.plan.coalesce_rounds):
            await control.clear_requests()
            issued: list[float] = []
            started = time.perf_counter()
            replies = await asyncio.gather(
                *(
                    _list_bytes(stubs[i % len(stubs)], request, issued)
                    for i in range(COALESCE_CALLS)
                )
            )
            walls.append(time.perf_counter() - started)
            spreads.append(max(issued) - min(issued))
            identical = identical and len(set(replies)) == 1
            counts.append(len(await logged_searches(control, direct.base_url)))
    finally:
        await control.set_latency(0.0)
    coalesced = await _metric(direct, metrics_url, "numbersvc_coalesced_calls_total")
    worst = max(counts)
    bench.figures["5_coalesce"] = {
        "calls_per_round": COALESCE_CALLS,
        "rounds": bench.plan.coalesce_rounds,
        "upstream_latency_seconds": COALESCE_LATENCY_SECONDS,
        "upstream_requests_per_round": counts,
        "max_upstream_requests": worst,
        "coalesced_calls_metric_delta": coalesced - coalesced_before,
        "replies_identical": identical,
        "issue_spread_ms": [1000 * s for s in spreads],
        "round_seconds": walls,
        "channels": len(stubs),
    }
    bench.rows.append(
        Row(
            "5 coalescing, 200 identical calls",
            f"{COALESCE_CALLS} upstream (uncoalesced)",
            f"{worst} upstream (max of {len(counts)})",
            f"{worst / COALESCE_CALLS:.3f}x",
            "<= 2 upstream requests",
            worst <= 2 and identical,
        )
    )


async def row_cpu(
    bench: Bench,
    service: Call,
    echo: Call,
    client: Call,
    pages: int,
    pids: Mapping[str, int],
) -> None:
    """Row 6: CPU per call at concurrency 32: the service vs its floor, echo + HTTP client.

    The floor is what any server of this kind spends: a bare grpc.aio echo (the echo server's
    CPU per call) plus the shipped upstream client making the same search (`PlivoClient`, in
    this process, whose CPU per call is that client's, as `bench.transports` measures it).
    """
    plan = bench.plan
    assignments = disjoint_assignments(pages, CONCURRENCY)
    phases: dict[str, list[Phase]] = {"server": [], "echo": [], "client": []}
    await run_phase(echo, assignments, plan.warmup_calls, {})
    await run_phase(client, assignments, plan.warmup_calls, {})
    for r in range(plan.cpu_rounds):
        refill = asyncio.create_task(asyncio.sleep(CPU_REFILL_SECONDS if r else 0.0))
        for name, call in (("echo", echo), ("client", client)):
            pid = {name: pids[name]}
            phases[name].append(await run_phase(call, assignments, plan.cpu_calls, pid))
        await refill  # the budget's burst refills before each service phase
        pid = {"server": pids["server"]}
        phases["server"].append(await run_phase(service, assignments, plan.cpu_calls, pid))
    svc, ech, cli = (cpu_ms_per_call(phases[name], name) for name in ("server", "echo", "client"))
    floor = ech + cli
    bench.figures["6_cpu"] = {
        "concurrency": CONCURRENCY,
        "rounds": plan.cpu_rounds,
        "calls_per_phase": plan.cpu_calls,
        "clock_ticks_per_second": _CLOCK_TICKS,
        "service_cpu_ms_per_call": svc,
        "echo_cpu_ms_per_call": ech,
        "client_cpu_ms_per_call": cli,
        "ratio": svc / floor,
        "target_ratio": CPU_TARGET,
        **{
            f"{name}_round_cpu_ms_per_call": [1000 * p.cpu[name] / p.calls for p in done]
            for name, done in phases.items()
        },
        "service_ms": latency_ms(phases["server"]),
        "echo_ms": latency_ms(phases["echo"]),
    }
    bench.rows.append(
        Row(
            "6 CPU per call, c=32 (vs floor)",
            f"echo {ech:.3f} + client {cli:.3f} ms",
            f"service {svc:.3f} ms",
            f"{svc / floor:.2f}x",
            f"<= {CPU_TARGET:g}x floor",
            svc / floor <= CPU_TARGET,
        )
    )


def shipped_client(sandbox_url: str) -> PlivoClient:
    """The upstream client as `numbersvc serve` builds it (its pool), on the sandbox."""
    return PlivoClient(
        base_url=sandbox_url,
        auth_id=DEFAULT_AUTH_ID,
        auth_token=DEFAULT_AUTH_TOKEN,
        max_connections=Config().upstream_max_connections,
    )


def client_call(plivo: PlivoClient) -> Call:
    """The upstream client's search for a page of row 6's filter, from this process."""
    query = {"country_iso": "US", "number_type": "local", "limit": str(PAGE_SIZE)}

    async def call(page: int) -> None:
        params = {**query, "offset": str(page * PAGE_SIZE)}
        response = await plivo.search_number_groups(params, timeout_seconds=CALL_TIMEOUT_SECONDS)
        if not isinstance(response.body, dict) or len(response.body["objects"]) != PAGE_SIZE:
            raise RuntimeError(f"client page {page}: not {PAGE_SIZE} groups")

    return call


async def row_budget(bench: Bench) -> None:
    """Row 7: a permit from the shared budget in each store vs from a local bucket, c=1."""
    figures = await budget.measure(bench.plan.budget_requests)
    bench.figures["7_budget"] = {
        "permits_per_limiter": bench.plan.budget_requests,
        "ms": figures,
        "target_p99_ms": budget.TARGET_P99_MS,
    }
    if "postgresql" not in figures:
        bench.notes.append("row 7: no PostgreSQL server binaries, the database was not measured")
    for store in (name for name in budget.SHARED if name in figures):
        ms, floor = figures[store], figures[budget.FLOOR[store]]
        bench.rows.append(
            Row(
                f"7 budget per upstream request p99, c=1 ({store})",
                f"{budget.FLOOR[store]} {_ms(floor['p99'])}, local bucket"
                f" {_ms(figures['local']['p99'])}",
                f"shared {_ms(ms['p99'])} (p50 {_ms(ms['p50'])})",
                f"{ms['p99'] - floor['p99']:+.2f} ms",
                f"p99 <= {budget.TARGET_P99_MS:.1f} ms",
                ms["p99"] <= budget.TARGET_P99_MS,
            )
        )


def zipf_draws(rng: random.Random, count: int) -> list[int]:
    """`count` filter indices, index k drawn with probability proportional to 1/(k+1)**s."""
    weights = [1 / (k + 1) ** ZIPF_EXPONENT for k in range(ZIPF_FILTERS)]
    return rng.choices(range(ZIPF_FILTERS), weights=weights, k=count)


def zipf_call(stubs: Sequence[pb_grpc.NumberGroupServiceAsyncStub]) -> Call:
    """A ListNumberGroups call for filter k (one of row 8's prefixes), the channels in turn."""
    requests = [
        pb.ListNumberGroupsRequest(
            filter=pb.SearchFilter(
                region_code="DE", number_type=pb.NUMBER_TYPE_LOCAL, prefix=prefix
            ),
            page_size=PAGE_SIZE,
        )
        for prefix in ZIPF_PREFIXES
    ]
    turn = 0

    async def call(k: int) -> None:
        nonlocal turn
        turn += 1
        stub = stubs[turn % len(stubs)]
        response = await stub.ListNumberGroups(requests[k], timeout=CALL_TIMEOUT_SECONDS)
        if len(response.number_groups) != PAGE_SIZE:
            raise RuntimeError(f"filter {k}: {len(response.number_groups)} groups")

    return call


async def _zipf_phase(
    call: Call,
    assignments: Sequence[Sequence[int]],
    seconds: float,
    pid: int,
    control: SandboxControl,
) -> tuple[Phase, int]:
    """One row-8 phase and the upstream searches it cost, from the sandbox's request log."""
    await control.clear_requests()
    phase = await run_phase(call, assignments, 10**9, {"server": pid}, seconds=seconds)
    upstream = sum(1 for r in await control.requests() if r["operation"] == "search")
    if upstream >= DEFAULT_MAX_RECORDS:
        raise RuntimeError(f"row 8: the sandbox's request log is full ({upstream}): shorter phases")
    return phase, upstream


async def row_cache(
    bench: Bench,
    sides: Mapping[str, tuple[Call, int]],
    control: SandboxControl,
    direct: Direct,
    metrics_url: str,
) -> None:
    """Row 8: Zipf load, the search cache at 2 s vs off, alternating phases, same draws."""
    plan = bench.plan
    rng = random.Random(7)
    # Enough draws per caller for any phase here; each round draws afresh, the same for both.
    draws = 4_000
    phases: dict[str, list[tuple[Phase, int]]] = {name: [] for name in sides}
    warm_up = [zipf_draws(rng, 8) for _ in range(ZIPF_CALLERS)]
    for call, _ in sides.values():  # open the upstream connections, warm both servers
        await run_phase(call, warm_up, 8 * ZIPF_CALLERS, {})
    hits_name = 'numbersvc_search_cache_requests_total{result="hit"}'
    hits_before = await _metric(direct, metrics_url, hits_name)
    lookups_before = await _metric(direct, metrics_url, "numbersvc_search_cache_requests_total")
    for r in range(plan.zipf_rounds):
        assignments = [zipf_draws(rng, draws) for _ in range(ZIPF_CALLERS)]
        order = list(sides.items())
        for name, (call, pid) in order if r % 2 == 0 else reversed(order):
            phases[name].append(
                await _zipf_phase(call, assignments, plan.zipf_seconds, pid, control)
            )
    hits = await _metric(direct, metrics_url, hits_name) - hits_before
    lookups = (
        await _metric(direct, metrics_url, "numbersvc_search_cache_requests_total") - lookups_before
    )
    figures: dict[str, Any] = {
        "filters": ZIPF_FILTERS,
        "zipf_exponent": ZIPF_EXPONENT,
        "callers": ZIPF_CALLERS,
        "channels": ZIPF_CHANNELS,
        "rounds": plan.zipf_rounds,
        "seconds_per_phase": plan.zipf_seconds,
        "cache_seconds": float(ZIPF_CACHE_SECONDS),
        "cache_hits": hits,
        "cache_lookups": lookups,
        "cache_hit_ratio": hits / lookups if lookups else 0.0,
    }
    for name, measured in phases.items():
        calls = sum(p.calls for p, _ in measured)
        upstream = sum(u for _, u in measured)
        figures[name] = {
            "calls": calls,
            "upstream_requests": upstream,
            "upstream_per_call": upstream / calls,
            "round_upstream_per_call": [u / p.calls for p, u in measured],
            "calls_per_second": rate([p for p, _ in measured]),
            "latency_ms": latency_ms([p for p, _ in measured]),
            "server_cpu_ms_per_call": cpu_ms_per_call([p for p, _ in measured], "server"),
        }
    bench.figures["8_cache"] = figures
    off, on = figures["off"], figures["cache"]
    per_call = on["upstream_per_call"]
    bench.rows.append(
        Row(
            f"8 cache 2 s, Zipf {ZIPF_FILTERS} filters, c={ZIPF_CALLERS}",
            f"off {off['upstream_per_call']:.3f} upstream/call",
            f"on {per_call:.3f} upstream/call ({on['calls_per_second']:,.0f} calls/s)",
            f"{per_call / off['upstream_per_call']:.3f}x",
            f"<= {ZIPF_TARGET} upstream/call",
            per_call <= ZIPF_TARGET,
        )
    )
    p50_off, p50_on = off["latency_ms"]["p50"], on["latency_ms"]["p50"]
    bench.rows.append(
        Row(
            "8 cache p50 latency",
            f"off {_ms(p50_off)} ({off['calls_per_second']:,.0f} calls/s)",
            f"on {_ms(p50_on)}",
            f"{p50_on / p50_off:.2f}x",
            "(reported)",
            None,
        )
    )


# --- The run ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        if (match := re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)) is not None:
            model = match.group(1).strip()
    versions = {}
    # sniffio: httpcore imports it on every request and pays for a failed import without it.
    for package in (
        "grpcio",
        "protobuf",
        "httpx",
        "httpcore",
        "h11",
        "anyio",
        "sniffio",
        "aiohttp",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "packages": versions,
    }


async def _seed_to(
    control: SandboxControl, direct: Direct, url: str, total: int, **spec: Any
) -> int:
    """Seed groups until the search at `url` counts `total`; return the count."""
    have = int((await direct.get(url))["meta"]["total_count"])
    if have < total:
        await control.seed(count=total - have, **spec)
    return int((await direct.get(url))["meta"]["total_count"])


_GROUPS_PATH: Final = f"/v1/Account/{DEFAULT_AUTH_ID}/AvailableNumberGroup/"


def _count_url(direct: Direct, **query: str) -> str:
    return _url(direct.base_url, _GROUPS_PATH, {**query, "limit": "1", "offset": "0"})


def unary_page_urls(base_url: str) -> list[str]:
    """The REST URLs of the pages `seed_unary` seeds (US local, `PAGE_SIZE` groups each)."""
    query = {"country_iso": "US", "number_type": "local", "limit": str(PAGE_SIZE)}
    return [
        _url(base_url, _GROUPS_PATH, {**query, "offset": str(offset)})
        for offset in range(0, UNARY_GROUPS, PAGE_SIZE)
    ]


@dataclass
class Rig:
    """A sandbox seeded for the unary rows, a direct client to it, and the servers started."""

    log_dir: Path
    url: str
    control: SandboxControl
    direct: Direct
    children: list[Child]

    async def server(self, name: str, extra_env: Mapping[str, str]) -> tuple[Child, str]:
        """Start a numbersvc server on the sandbox (rate budget off); stopped with the rig."""
        env = server_env(self.url, rate_off=True, extra=extra_env)
        server, target = await start_server(name, env, self.log_dir)
        self.children.append(server)
        return server, target


@contextlib.asynccontextmanager
async def unary_rig(prefix: str) -> AsyncIterator[Rig]:
    """Start and seed a sandbox for the unary load; stop every process started on it after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        children: list[Child] = []
        try:
            sandbox, url = await start_sandbox(Path(tmp))
            children.append(sandbox)
            async with SandboxControl(url, timeout_seconds=60.0) as control:
                direct = Direct(url)
                try:
                    await seed_unary(control, direct)
                    yield Rig(Path(tmp), url, control, direct, children)
                finally:
                    await direct.aclose()
        finally:
            for child in reversed(children):
                await child.stop(signal.SIGINT if child.name == "sandbox" else signal.SIGTERM)


async def seed_unary(control: SandboxControl, direct: Direct) -> None:
    """Seed US local groups up to `UNARY_GROUPS` (100 pages), for rows 1, 2 and 6."""
    url = _count_url(direct, country_iso="US", number_type="local")
    got = await _seed_to(control, direct, url, UNARY_GROUPS, country_iso="US")
    if got != UNARY_GROUPS:
        raise RuntimeError(f"US local has {got} groups, expected {UNARY_GROUPS}")


async def _seed(control: SandboxControl, direct: Direct, plan: Plan) -> None:
    """Seed the groups rows 1-4 read: US local to 2,000, a 1,000-group filter, the walk bucket."""
    await seed_unary(control, direct)
    walk = _count_url(direct, country_iso="US", number_type="tollfree", prefix=WALK_PREFIX)
    got = await _seed_to(
        control,
        direct,
        walk,
        WALK_GROUPS,
        country_iso="US",
        number_type="tollfree",
        prefix=WALK_PREFIX,
    )
    if got != WALK_GROUPS:
        raise RuntimeError(f"the walk filter has {got} groups, expected {WALK_GROUPS}")
    if 8 in plan.rows:
        await seed_zipf(control, direct)
    if 4 not in plan.rows:
        return
    memory = _count_url(direct, country_iso="CA", number_type="tollfree")
    # A page more than the walk takes, so that `max_results` ends it, not the inventory.
    target = plan.memory_groups + PAGE_SIZE
    await _seed_to(control, direct, memory, target, country_iso="CA", number_type="tollfree")


async def seed_zipf(control: SandboxControl, direct: Direct) -> None:
    """Seed one page of DE local groups under each of row 8's prefixes."""
    for prefix in ZIPF_PREFIXES:
        url = _count_url(direct, country_iso="DE", number_type="local", prefix=prefix)
        got = await _seed_to(control, direct, url, PAGE_SIZE, country_iso="DE", prefix=prefix)
        if got != PAGE_SIZE:
            raise RuntimeError(f"DE local prefix {prefix} has {got} groups, expected {PAGE_SIZE}")


@contextlib.asynccontextmanager
async def _channels(target: str, count: int = 1) -> AsyncIterator[list[grpc.aio.Channel]]:
    channels = [grpc.aio.insecure_channel(target) for _ in range(count)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), _START_TIMEOUT_SECONDS)
        yield channels
    finally:
        for channel in channels:
            await channel.close()


@contextlib.asynccontextmanager
async def _server(
    bench: Bench, procs: _Procs, name: str, *, rate_off: bool, env: Mapping[str, str] = {}
) -> AsyncIterator[tuple[Child, str]]:
    """A server on the sandbox for some rows; stopped after them, its exit and errors noted.

    `env` goes over the bench's extra server environment. If the rows fail, `run_bench` stops
    it with every other child.
    """
    env = server_env(procs.sandbox_url, rate_off=rate_off, extra={**bench.server_env, **env})
    server, target = await start_server(name, env, procs.log_dir)
    procs.children.append(server)
    yield server, target
    procs.children.remove(server)
    await _stop_server(server, bench)


async def _stop_server(child: Child, bench: Bench) -> None:
    code = await child.stop()
    errors = child.error_lines()
    if code != 0:
        bench.notes.append(f"{child.name} exited with {code} after SIGTERM")
    if errors:
        bench.notes.append(f"{child.name} logged {len(errors)} ERROR lines: {errors[0]}")


async def run_bench(plan: Plan, extra_env: Mapping[str, str], log_dir: Path) -> Bench:
    """Start the processes, run the rows, stop everything; return what was measured."""
    bench = Bench(plan=plan, server_env=dict(extra_env), machine=machine())
    bench.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    began = time.perf_counter()
    children: list[Child] = []
    try:
        sandbox, sandbox_url = await start_sandbox(log_dir)
        children.append(sandbox)
        echo, echo_target = await start_echo(log_dir)
        children.append(echo)
        facade, facade_target = await start_facade(log_dir, sandbox_url)
        children.append(facade)
        async with SandboxControl(sandbox_url, timeout_seconds=120.0) as control:
            direct = Direct(sandbox_url)
            try:
                _progress("seeding the sandbox")
                await _seed(control, direct, plan)
                procs = _Procs(
                    log_dir, children, sandbox, sandbox_url, echo, echo_target, facade_target
                )
                if plan.rows & {1, 2, 3, 4}:
                    await _rows_1_to_4(bench, procs, control, direct)
                if plan.rows & {5, 6}:
                    await _rows_5_and_6(bench, procs, control, direct)
                if 7 in plan.rows:
                    _progress("row 7: the shared budget's cost per request")
                    await row_budget(bench)
                if 8 in plan.rows:
                    await _row_8(bench, procs, control, direct)
                if plan.rows & {9, 10, 11}:
                    from bench import replicas  # here: it imports this module back

                    await replicas.run(bench, procs, control)
                if 12 in plan.rows:
                    from bench import tracing  # here: it imports this module back

                    await tracing.row(bench, procs, control, direct)
            finally:
                await direct.aclose()
    finally:
        for child in reversed(children):
            if child.name.startswith("server"):
                await _stop_server(child, bench)
            else:
                await child.stop(signal.SIGINT if child.name == "sandbox" else signal.SIGTERM)
    bench.seconds = time.perf_counter() - began
    return bench


@dataclass
class _Procs:
    log_dir: Path
    children: list[Child]  # stopped in reverse order at the end
    sandbox: Child
    sandbox_url: str
    echo: Child
    echo_target: str
    facade_target: str


async def _rows_1_to_4(
    bench: Bench, procs: _Procs, control: SandboxControl, direct: Direct
) -> None:
    async with (
        _server(bench, procs, "server-rate-off", rate_off=True) as (server, target),
        _channels(target) as (channel,),
        _channels(procs.echo_target) as (echo_channel,),
        _channels(procs.facade_target) as (facade_channel,),
    ):
        pids = {"server": server.pid, "sandbox": procs.sandbox.pid, "bench": os.getpid()}
        stub = pb_grpc.NumberGroupServiceStub(channel)
        pages = await collect_pages(stub, control, direct.base_url, UNARY_FILTER)
        service = list_call(stub, pages, UNARY_FILTER)
        rest = direct_call(direct.get, pages.urls)
        echo = echo_call(echo_stub(echo_channel), pages)
        rows = bench.plan.rows
        if 1 in rows:
            _progress(f"row 1: {bench.plan.unary_calls:,} calls per side, concurrency 1")
            facade = facade_call(facade_channel, pages, direct.base_url)
            await row_unary(bench, service, rest, echo, facade, len(pages))
        if 2 in rows:
            _progress(
                f"row 2: {bench.plan.throughput_rounds} x {bench.plan.throughput_seconds:g} s"
                f" per side, concurrency {CONCURRENCY}"
            )
            await row_throughput(bench, service, rest, len(pages), pids)
        if 3 in rows:
            _progress(f"row 3: {bench.plan.walk_reps} walks per side")
            await row_walk(bench, stub, direct, control)
        if 4 in rows:
            _progress(f"row 4: one stream of {bench.plan.memory_groups:,} groups")
            await row_memory(bench, stub, server.pid)


async def _rows_5_and_6(
    bench: Bench, procs: _Procs, control: SandboxControl, direct: Direct
) -> None:
    channel_count = COALESCE_CALLS // CALLS_PER_CHANNEL
    async with (
        _server(bench, procs, "server-defaults", rate_off=False) as (server, target),
        _channels(target, channel_count) as channels,
        _channels(procs.echo_target) as (echo_ch,),
    ):
        match = _METRICS_URL.search(server.log())
        if match is None:
            raise RuntimeError(f"no metrics address in the server's log:\n{server.tail()}")
        stubs = [pb_grpc.NumberGroupServiceStub(channel) for channel in channels]
        if 5 in bench.plan.rows:
            _progress(f"row 5: {bench.plan.coalesce_rounds} rounds of {COALESCE_CALLS} calls")
            await row_coalesce(bench, stubs, control, direct, match.group(1))
        if 6 in bench.plan.rows:
            # 100 pages and a warm-up of 2 calls per worker (opening the upstream connections) take
            # 164 tokens of the budget's 300; the refill before the first row-6 phase fills it.
            pages = await collect_pages(stubs[0], control, direct.base_url, UNARY_FILTER)
            service = list_call(stubs[0], pages, UNARY_FILTER)
            echo = echo_call(echo_stub(echo_ch), pages)
            await run_phase(service, disjoint_assignments(len(pages), CONCURRENCY), 64, {})
            _progress(
                f"row 6: {bench.plan.cpu_rounds} x {bench.plan.cpu_calls} calls per side,"
                f" concurrency {CONCURRENCY}"
            )
            await asyncio.sleep(CPU_REFILL_SECONDS)
            pids = {"server": server.pid, "echo": procs.echo.pid, "client": os.getpid()}
            async with shipped_client(procs.sandbox_url) as plivo:
                await row_cpu(bench, service, echo, client_call(plivo), len(pages), pids)
            waits = await _metric(direct, match.group(1), "numbersvc_rate_limiter_waits_total")
            bench.figures["6_cpu"]["rate_limiter_waits"] = waits
            if waits:
                bench.notes.append(f"row 6: {waits:.0f} calls waited for the rate budget")


async def _row_8(bench: Bench, procs: _Procs, control: SandboxControl, direct: Direct) -> None:
    cache = {"NUMBERSVC_SEARCH_CACHE_SECONDS": ZIPF_CACHE_SECONDS}
    off = {"NUMBERSVC_SEARCH_CACHE_SECONDS": "0"}
    async with (
        _server(bench, procs, "server-cache-off", rate_off=True, env=off) as (plain, plain_at),
        _server(bench, procs, "server-cache-2s", rate_off=True, env=cache) as (cached, cached_at),
        _channels(plain_at, ZIPF_CHANNELS) as plain_channels,
        _channels(cached_at, ZIPF_CHANNELS) as cached_channels,
    ):
        match = _METRICS_URL.search(cached.log())
        if match is None:
            raise RuntimeError(f"no metrics address in the server's log:\n{cached.tail()}")
        sides = {
            "off": (zipf_call([_stub(c) for c in plain_channels]), plain.pid),
            "cache": (zipf_call([_stub(c) for c in cached_channels]), cached.pid),
        }
        _progress(
            f"row 8: {bench.plan.zipf_rounds} x {bench.plan.zipf_seconds:g} s per side,"
            f" {ZIPF_CALLERS} callers, Zipf over {ZIPF_FILTERS} filters"
        )
        await row_cache(bench, sides, control, direct, match.group(1))


def _stub(channel: grpc.aio.Channel) -> pb_grpc.NumberGroupServiceAsyncStub:
    return pb_grpc.NumberGroupServiceStub(channel)


def _progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


# --- Output -------------------------------------------------------------------------------------


def render(bench: Bench) -> str:
    """The table, with a header saying what ran where."""
    m = bench.machine
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    env = " ".join(f"{k}={v}" for k, v in bench.server_env.items()) or "none"
    plan = bench.plan
    lines = [
        f"numbersvc bench ({plan.mode}), {bench.started}, {bench.seconds:.0f} s;"
        f" {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}; {packages}",
        "server: shipped defaults; rows 1-4 and 8 with NUMBERSVC_UPSTREAM_RATE=off, rows 5-6 with"
        f" the default budget; extra server env: {env}",
        f"iterations: row 1 {plan.unary_calls:,} calls per side (+{plan.warmup_calls} warm-up);"
        f" row 2 {plan.throughput_rounds} x {plan.throughput_seconds:g} s per side;"
        f" row 3 {plan.walk_reps} walks per side (+1 warm-up); row 5 {plan.coalesce_rounds}"
        f" rounds; row 6 {plan.cpu_rounds} x {plan.cpu_calls} per side; row 7"
        f" {plan.budget_requests:,} permits per limiter; row 8 {plan.zipf_rounds} x"
        f" {plan.zipf_seconds:g} s per side",
    ]
    if plan.rows != FULL.rows:
        lines.append(f"rows run: {', '.join(map(str, sorted(plan.rows)))}")
    lines.append("")
    header = ("row", "baseline", "figure", "ratio", "target", "met?")
    cells = [header] + [
        (r.row, r.baseline, r.figure, r.ratio, r.target, _yes(r.met)) for r in bench.rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if row is header:
            lines.append("  ".join("-" * w for w in widths))
    lines += [f"note: {note}" for note in bench.notes]
    missed = [r.row for r in bench.rows if r.met is False]
    lines.append("targets missed: " + ("; ".join(missed) if missed else "none"))
    return "\n".join(lines)


def to_json(bench: Bench) -> dict[str, Any]:
    """The run as JSON: machine, plan, the table's rows and every figure behind them."""
    return {
        "started": bench.started,
        "seconds": bench.seconds,
        "command": " ".join(["python -m bench.bench", *sys.argv[1:]]),
        "machine": bench.machine,
        "plan": {**asdict(bench.plan), "rows": sorted(bench.plan.rows)},
        "server_env": bench.server_env,
        "rows": [asdict(row) for row in bench.rows],
        "figures": bench.figures,
        "notes": bench.notes,
    }


def _rows(text: str) -> frozenset[int]:
    try:
        rows = frozenset(int(part) for part in text.split(","))
    except ValueError:
        rows = frozenset({0})
    if not rows or not rows <= FULL.rows:
        raise argparse.ArgumentTypeError(
            f"expected row numbers {min(FULL.rows)} to {max(FULL.rows)}, like 1,2; got {text!r}"
        )
    return rows


#: What a failed run raises: a child process, the network, the sandbox's control API, a call.
FAILURES: Final = (
    RuntimeError,
    OSError,
    TimeoutError,
    httpx.HTTPError,
    aiohttp.ClientError,
    grpc.aio.AioRpcError,
)


def finish(
    measure: Callable[[], Coroutine[Any, Any, dict[str, Any]]],
    render: Callable[[dict[str, Any]], str],
    json_path: Path | None,
    what: str,
) -> int:
    """Run a measurement, print it and write its figures to `json_path`; 2 when it fails."""
    try:
        result = asyncio.run(measure())
    except FAILURES as exc:
        print(f"error: {what} failed: {exc}", file=sys.stderr)
        return 2
    print(render(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def env_pair(text: str) -> tuple[str, str]:
    """Parse `NAME=VALUE` (an argparse `type` for the server-env flags)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def add_server_env(parser: argparse.ArgumentParser, servers: str) -> None:
    """Add the repeatable `--server-env NAME=VALUE` flag; its values are `env_pair`s."""
    parser.add_argument(
        "--server-env",
        type=env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"an extra environment variable for {servers} (repeatable)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench, print the table, write the JSON; 0 measured, 2 failed."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer iterations, 20,000 groups for row 4"
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, metavar="PATH", help="where to write figures"
    )
    add_server_env(parser, "both servers")
    parser.add_argument(
        "--rows",
        type=_rows,
        default=FULL.rows,
        metavar="N,N",
        help="run only these rows (default: all)",
    )
    parser.add_argument(
        "--keep-logs", type=Path, metavar="DIR", help="keep the processes' logs in DIR"
    )
    args = parser.parse_args(argv)
    plan = dataclasses.replace(QUICK if args.quick else FULL, rows=args.rows)
    with contextlib.ExitStack() as stack:
        if args.keep_logs is not None:
            log_dir: Path = args.keep_logs
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        try:
            bench = asyncio.run(run_bench(plan, dict(args.server_env), log_dir))
        except grpc.aio.AioRpcError as exc:
            print(f"error: bench failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
        except FAILURES as exc:
            print(f"error: bench failed: {exc}", file=sys.stderr)
            return 2
    print(render(bench))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(to_json(bench), indent=2) + "\n", encoding="utf-8")
    print(f"figures written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
