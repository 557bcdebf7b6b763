"""Profile the server process under the row-2 load of `bench.bench`, with py-spy.

    python -m bench.profile [--seconds 20] [--rate 250] [--out DIR]

Starts the sandbox and a server exactly as `bench.bench` does for rows 1-4 (shipped defaults,
`NUMBERSVC_UPSTREAM_RATE=off`), warms it up, then runs the row-2 load (32 concurrent
ListNumberGroups calls, each worker on its own pages) while `py-spy record` samples the server
process (non-blocking, without line numbers). It writes py-spy's raw collapsed stacks (for
flamegraph.pl or speedscope) and a text summary: the samples attributed to the component that
spent them, named hot spots (inclusive), and the functions on the stack and at its top.

Native frames (`py-spy --native`) are not available for this interpreter here, so C code shows
as the Python frame that called it: `Handle._run` (asyncio) is Cython/C work run as an event
loop callback (grpc's aio machinery, mostly), `Thread.run` a thread with no Python frames
(grpc's completion-queue poller).

py-spy is a profiling tool only, not a dependency: `pip install py-spy` into the venv first.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from bench.bench import (
    CONCURRENCY,
    DEFAULT_JSON,
    FAILURES,
    UNARY_FILTER,
    Call,
    add_server_env,
    collect_pages,
    cpu_seconds,
    disjoint_assignments,
    list_call,
    run_phase,
    unary_rig,
)
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

__all__ = ["HOT_SPOTS", "Profile", "attribute", "main", "summarize"]

DEFAULT_OUT: Final = DEFAULT_JSON.parent
_CHUNK_CALLS: Final = 500  # calls per load phase; phases repeat until py-spy is done

#: Components by how a frame's path starts, first match wins (paths as py-spy prints them:
#: relative to site-packages or the standard library).
COMPONENTS: Final[Sequence[tuple[str, tuple[str, ...]]]] = (
    ("numbersvc interceptors (call record, access log)", ("numbersvc/interceptors.py",)),
    ("numbersvc gatekeeper", ("numbersvc/gatekeeper.py",)),
    ("numbersvc metrics", ("numbersvc/metrics.py",)),
    ("numbersvc translation (JSON -> protobuf)", ("numbersvc/translation.py",)),
    ("numbersvc validation", ("numbersvc/validation.py",)),
    ("numbersvc paging (page tokens)", ("numbersvc/paging.py",)),
    ("numbersvc coalescing", ("numbersvc/coalesce.py",)),
    ("numbersvc upstream transport (aiohttp under httpx)", ("numbersvc/upstream/transport.py",)),
    ("numbersvc upstream client + retry", ("numbersvc/upstream/",)),
    ("numbersvc logs", ("numbersvc/logs.py",)),
    ("numbersvc service + deadline", ("numbersvc/service.py", "numbersvc/deadline.py")),
    # `numbersvc serve` runs the loop: what is charged to its frame is the loop's own work.
    ("asyncio event loop itself (run_once, epoll)", ("numbersvc/cli/", "<frozen runpy")),
    ("numbersvc other", ("numbersvc/",)),
    ("httpx", ("httpx/",)),
    ("httpcore", ("httpcore/",)),
    ("h11", ("h11/",)),
    ("aiohttp (+ yarl, multidict)", ("aiohttp/", "yarl/", "multidict/", "propcache/")),
    ("anyio", ("anyio/", "sniffio/")),
    ("logging (stdlib)", ("logging/",)),
    ("prometheus_client", ("prometheus_client/",)),
    ("grpc (Python part)", ("grpc/", "grpc_")),
    ("protobuf", ("google/protobuf/",)),
    ("json (stdlib)", ("json/",)),
    ("asyncio (stdlib)", ("asyncio/",)),
    ("import machinery", ("<frozen importlib", "_distutils_hack")),
    ("other", ("",)),
)
#: Frames that only pass the CPU on: a sample is charged to the nearest frame below them
#: (towards the root) that is not one of these.
_GENERIC: Final = (
    "asyncio/",
    "contextlib.py",
    "<frozen",
    "_distutils_hack",
    "functools.py",
    "typing.py",
    "abc.py",
    "enum.py",
    "re/",
    "selectors.py",
    "socket.py",
    "ssl.py",
    "threading.py",
    "json/",
    "logging/",
    "urllib/",
    "base64.py",
    "uuid.py",
)
_EVENT_LOOP_NATIVE: Final = "native code run by the event loop (grpc aio Cython, C tasks)"
_THREAD_NATIVE: Final = "native thread without Python frames (grpc poller)"

#: Named hot spots: label, and the frames (`function (path)` prefixes) that mark them.
HOT_SPOTS: Final[Sequence[tuple[str, tuple[str, ...]]]] = (
    ("upstream request: httpx AsyncClient.request, whole", ("AsyncClient.request (httpx/",)),
    (
        "  httpcore current_async_library (without sniffio its import fails each time)",
        ("current_async_library (httpcore/",),
    ),
    (
        "  httpcore pool: scan of every pooled connection per request",
        ("AsyncConnectionPool._assign_requests_to_connections (httpcore/",),
    ),
    (
        "  httpx's own work: request building (URL parsing, headers)",
        ("BaseClient.build_request (httpx/",),
    ),
    (
        "  httpx's own work: cookie extraction from each response",
        ("Cookies.extract_cookies (httpx/",),
    ),
    ("  aiohttp transport, whole", ("AiohttpTransport.handle_async_request (numbersvc/",)),
    ("  json.loads of the upstream body", ("loads (json/",)),
    ("translation.parse_search_page (20 groups)", ("parse_search_page (numbersvc/",)),
    (
        "  translation: shared fields and Money, on a cache miss",
        ("_shared_fields (numbersvc/translation",),
    ),
    ("page token (encode_page_token)", ("encode_page_token (numbersvc/",)),
    ("request validation (validate_list)", ("validate_list (numbersvc/",)),
    ("access log line (AccessLog.call_finished)", ("AccessLog.call_finished (numbersvc/",)),
    ("request-id log filter (_RequestIdFilter)", ("_RequestIdFilter.filter (numbersvc/",)),
    (
        "metrics (Metrics.call_finished, upstream_response)",
        ("Metrics.call_finished (numbersvc/", "Metrics.upstream_response (numbersvc/"),
    ),
    ("call record set-up (_Call.__init__, uuid4)", ("_Call.__init__ (numbersvc/",)),
    ("asyncio.timeout (attempt bound)", ("timeout (asyncio/timeouts.py)", "Timeout.")),
    (_EVENT_LOOP_NATIVE, ()),
    (_THREAD_NATIVE, ()),
)


def component(frame: str) -> str:
    """The component a py-spy frame (`function (path)`) belongs to."""
    path = frame.rpartition(" (")[2].rstrip(")")
    return next(name for name, marks in COMPONENTS if path.startswith(marks))


def _generic(frame: str) -> bool:
    return frame.rpartition(" (")[2].startswith(_GENERIC)


def attribute(stack: Sequence[str]) -> str:
    """Who spent a sample: the leaf's component, or its nearest specific caller's."""
    leaf = stack[-1]
    if leaf.startswith("Handle._run (asyncio/"):
        return _EVENT_LOOP_NATIVE
    if leaf.startswith("Thread.run (threading"):
        return _THREAD_NATIVE
    for frame in reversed(stack):
        if not _generic(frame):
            return component(frame)
    return component(leaf)


@dataclass
class Profile:
    """Collapsed stacks: stack (root first) -> samples."""

    stacks: Counter[tuple[str, ...]]

    @classmethod
    def parse(cls, lines: Iterable[str]) -> Profile:
        """Read py-spy's `--format raw` output."""
        stacks: Counter[tuple[str, ...]] = Counter()
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                stacks[tuple(stack.split(";"))] += int(count)
        return cls(stacks)

    @property
    def total(self) -> int:
        """All samples."""
        return sum(self.stacks.values())

    def attributed(self) -> Counter[str]:
        """Samples by the component that spent them (see `attribute`)."""
        found: Counter[str] = Counter()
        for stack, n in self.stacks.items():
            found[attribute(stack)] += n
        return found

    def hot_spots(self) -> Counter[str]:
        """Samples inside each named hot spot (inclusive; a sample counts once per spot)."""
        found: Counter[str] = Counter()
        for stack, n in self.stacks.items():
            leaf = attribute(stack)
            for label, marks in HOT_SPOTS:
                if label == leaf or any(f.startswith(marks) for f in stack if marks):
                    found[label] += n
        return found

    def inclusive_by_function(self) -> Counter[str]:
        """Samples with the function anywhere on the stack."""
        found: Counter[str] = Counter()
        for stack, n in self.stacks.items():
            for frame in set(stack):
                found[frame] += n
        return found

    def self_by_function(self) -> Counter[str]:
        """Samples by their leaf frame."""
        found: Counter[str] = Counter()
        for stack, n in self.stacks.items():
            found[stack[-1]] += n
        return found


def _table(title: str, rows: Iterable[tuple[str, int]], total: int) -> list[str]:
    lines = [title, f"{'samples':>8} {'share':>6}  what"]
    lines += [f"{n:>8} {100 * n / total:>5.1f}%  {name}" for name, n in rows]
    return lines


def summarize(profile: Profile, header: Sequence[str], limit: int = 25) -> str:
    """The text summary of a profile."""
    total = profile.total
    if not total:
        return "\n".join([*header, "no samples"])
    spots = profile.hot_spots()
    lines = [*header, f"samples: {total}", ""]
    lines += _table(
        "where the CPU went (each sample charged to its leaf's component, or to the nearest"
        " caller that is not stdlib plumbing):",
        profile.attributed().most_common(),
        total,
    )
    lines.append("")
    lines += _table(
        "hot spots (inclusive: the share of samples inside each):",
        ((label, spots[label]) for label, _ in HOT_SPOTS),
        total,
    )
    lines.append("")
    lines += _table(
        "functions on the stack (inclusive):",
        profile.inclusive_by_function().most_common(limit),
        total,
    )
    lines.append("")
    lines += _table(
        "functions at the top of the stack (self):",
        profile.self_by_function().most_common(limit),
        total,
    )
    return "\n".join(lines)


async def _load_until(process: asyncio.subprocess.Process, call: Call, pages: int) -> int:
    calls = 0
    assignments = disjoint_assignments(pages, CONCURRENCY)
    while process.returncode is None:
        await run_phase(call, assignments, _CHUNK_CALLS, {})
        calls += _CHUNK_CALLS
    return calls


async def profile_server(
    spy: str, seconds: float, rate: int, raw: Path, extra_env: Mapping[str, str]
) -> list[str]:
    """Run the row-2 load on a fresh server while py-spy records it into `raw`.

    Returns:
        The summary's header: what was recorded, the load and the server's CPU per call.
    """
    async with unary_rig("bench-profile-") as rig:
        server, target = await rig.server("server-rate-off", extra_env)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.NumberGroupServiceStub(channel)
            pages = await collect_pages(stub, rig.control, rig.url, UNARY_FILTER)
            call = list_call(stub, pages, UNARY_FILTER)
            assignments = disjoint_assignments(len(pages), CONCURRENCY)
            await run_phase(call, assignments, 1_000, {})  # warm-up
            argv = [spy, "record", "--pid", str(server.pid), "--rate", str(rate)]
            argv += ["--duration", f"{seconds:g}", "--format", "raw", "-o", str(raw)]
            argv += ["--nolineno", "--nonblocking"]
            cpu_before = cpu_seconds(server.pid)
            started = time.perf_counter()
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            calls = await _load_until(process, call, len(pages))
            wall = time.perf_counter() - started
            cpu = cpu_seconds(server.pid) - cpu_before
            if await process.wait() != 0:
                raise RuntimeError(f"py-spy exited with {process.returncode}")
    return [
        f"py-spy record of the server under the row-2 load ({CONCURRENCY} concurrent"
        f" ListNumberGroups, rate budget off): {seconds:g} s at {rate} Hz,"
        " non-blocking, idle samples excluded",
        f"load: {calls:,} calls in {wall:.1f} s ({calls / wall:,.0f} calls/s); server CPU"
        f" {cpu:.2f} s = {1000 * cpu / calls:.2f} ms per call",
        f"raw stacks: {raw}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, profile, print the summary; 2 when it fails."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="how long py-spy records")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write")
    add_server_env(parser, "the server")
    args = parser.parse_args(argv)
    extra = dict(args.server_env)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("error: py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "profile-row2.raw.txt"
    try:
        header = asyncio.run(profile_server(spy, args.seconds, args.rate, raw, extra))
    except FAILURES as exc:
        print(f"error: profile failed: {exc}", file=sys.stderr)
        return 2
    with raw.open(encoding="utf-8") as lines:
        text = summarize(Profile.parse(lines), header)
    (args.out / "profile-row2.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
