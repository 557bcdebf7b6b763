"""Where one unary call's wall time goes, stage by stage, on the server: issue 11.

    python -m bench.stages [--calls N] [--json PATH] [--server-env NAME=VALUE ...]

Starts the sandbox and a `numbersvc serve` in which this module (`python -m bench.stages
serve ...`) first wraps a few functions at the hops of a ListNumberGroups call, then makes N
calls at concurrency 1 (after a warm-up) and prints, for each stage, the median time since the
stage before it, measured with `time.perf_counter_ns` inside the server, and the client's own
median wall time around it. Nothing of this is in numbersvc's code: the wrapping is done here,
in the bench's copy of the server process, so production pays nothing for it (not even a flag
check). At concurrency 1 only one call is in flight, so the stages of a call are simply the
marks made since its `received`.

The stages, in the order a call meets them:

- received: the interceptor is asked for the call's handler (metadata read by gRPC).
- handlers chosen: the interceptor chose and wrapped the method's handler (gatekeeper's too).
- handler entered: the outermost handler wrapper runs (the request message read and decoded).
- authorized: the servicer's validation starts (the call record and the gatekeeper are behind).
- validated: validation done.
- budget taken: a permit from the rate budget (the server runs with a budget too large to
  ever make it wait, `NUMBERSVC_UPSTREAM_RATE=1000000/1s`).
- to aiohttp: the request reached the aiohttp transport (`AiohttpTransport._send`, which both
  the direct path of `PlivoClient` and httpx's client pass through).
- upstream sent: aiohttp wrote the request (`ClientRequest.send` returned).
- upstream answered: aiohttp read the status line and headers (`ClientResponse.start`).
- body read: the upstream client read the body.
- body decoded: the upstream client decoded the JSON (`PlivoClient._decode`).
- translated: the page turned into protobuf (`translation.parse_search_page`).
- response built: the servicer's method returned its response.
- call observed: the interceptor ended the call's record (and span); for a unary call that
  succeeded the access line and the metrics run at the loop's next turn, after the answer.
- handler returned: the outermost handler wrapper returns.
- serialized: gRPC serialized the response.
- sent: the call is done (`context.add_done_callback`: status and trailers sent).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import itertools
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from bench.bench import (
    UNARY_FILTER,
    Child,
    _channels,
    add_server_env,
    collect_pages,
    finish,
    list_call,
    server_env,
    unary_rig,
)
from numbersvc.sandbox import SandboxControl
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

__all__ = ["STAGES", "install", "main", "measure"]

STAGES: Final = (
    "received",
    "handlers chosen",
    "handler entered",
    "authorized",
    "validated",
    "budget taken",
    "to aiohttp",
    "upstream sent",
    "upstream answered",
    "body read",
    "body decoded",
    "translated",
    "response built",
    "call observed",
    "handler returned",
    "serialized",
    "sent",
)
_OUT_ENV: Final = "BENCH_STAGES_OUT"
_SERVING: Final = re.compile(r"serving on 127\.0\.0\.1:(\d+)")
_F = TypeVar("_F", bound=Callable[..., Any])

# The call in flight (concurrency 1): stage -> perf_counter_ns; every finished call's marks.
_current: dict[str, int] = {}
_calls: list[dict[str, int]] = []


def _mark(stage: str, marks: dict[str, int] | None = None) -> None:
    (_current if marks is None else marks).setdefault(stage, time.perf_counter_ns())


def _after(stage: str, function: _F) -> _F:
    """`function` (sync or async), marking `stage` when it returns."""
    if asyncio.iscoroutinefunction(function):

        @functools.wraps(function)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            result = await function(*args, **kwargs)
            _mark(stage)
            return result

        return run_async  # type: ignore[return-value]

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        _mark(stage)
        return result

    return run  # type: ignore[return-value]


def _before(stage: str, function: _F) -> _F:
    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        _mark(stage)
        return function(*args, **kwargs)

    return run  # type: ignore[return-value]


def install() -> None:
    """Wrap numbersvc's (and aiohttp's) functions at each hop; call before the server starts."""
    import aiohttp.client_reqrep as reqrep

    from numbersvc import interceptors, service, translation, validation
    from numbersvc.upstream import client, transport

    observing = interceptors.ObservingInterceptor
    intercept = observing.intercept_service

    # RpcMethodHandler is a namedtuple at run time; the stubs do not say so: Any.
    async def intercept_service(self: Any, continuation: Any, details: Any) -> Any:
        global _current  # one call at a time: this is the bench's own copy of the server
        _current = {}
        _mark("received")
        handler: Any = await intercept(self, continuation, details)
        _mark("handlers chosen")
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        async def run(request: Any, context: Any) -> Any:
            _mark("handler entered")
            # This call's own marks: its end may come after the next call began.
            context.add_done_callback(functools.partial(_done, _current))
            try:
                return await behaviour(request, context)
            finally:
                _mark("handler returned")

        serializer: Callable[[Any], bytes] = handler.response_serializer
        return handler._replace(
            unary_unary=run, response_serializer=_after("serialized", serializer)
        )

    observing.intercept_service = intercept_service  # type: ignore[method-assign,assignment]
    validation.validate_list = _after("validated", _before("authorized", validation.validate_list))
    translation.parse_search_page = _after("translated", translation.parse_search_page)
    servicer = service.NumberGroupServicer
    servicer.ListNumberGroups = _after(  # type: ignore[method-assign]
        "response built", servicer.ListNumberGroups
    )
    interceptors._Call._finish = _after(  # type: ignore[method-assign]
        "call observed", interceptors._Call._finish
    )
    plivo = client.PlivoClient
    plivo._take_token = _after("budget taken", plivo._take_token)  # type: ignore[method-assign]
    plivo._read_body = _after("body read", plivo._read_body)  # type: ignore[method-assign]
    plivo._decode = _after("body decoded", plivo._decode)  # type: ignore[method-assign]
    aiohttp_stack = transport.AiohttpTransport
    aiohttp_stack._send = _before("to aiohttp", aiohttp_stack._send)  # type: ignore[method-assign]
    reqrep.ClientRequest.send = _after("upstream sent", reqrep.ClientRequest.send)  # type: ignore[method-assign]
    reqrep.ClientResponse.start = _after("upstream answered", reqrep.ClientResponse.start)  # type: ignore[method-assign]


def _done(marks: dict[str, int], _context: Any) -> None:
    _mark("sent", marks)
    _calls.append(marks)


def _dump(path: str) -> None:
    Path(path).write_text(json.dumps(_calls))


def _serve(argv: Sequence[str]) -> int:
    from numbersvc.cli.main import main as numbersvc_main

    install()
    atexit.register(_dump, os.environ[_OUT_ENV])
    return numbersvc_main(["serve", *argv])


async def measure(
    calls: int, warmup: int, extra_env: Sequence[tuple[str, str]] = ()
) -> dict[str, Any]:
    """Start the sandbox and the instrumented server, make the calls, return the medians."""
    async with unary_rig("bench-stages-") as rig:
        out = rig.log_dir / "stages.json"
        env = server_env(rig.url, rate_off=False, extra=dict(extra_env))
        env.update({"NUMBERSVC_UPSTREAM_RATE": "1000000/1s", _OUT_ENV: str(out)})
        argv = (sys.executable, "-m", "bench.stages", "serve", "--listen", "127.0.0.1:0")
        server = Child("server-stages", argv, env, rig.log_dir)
        rig.children.append(server)
        port = await server.start(_SERVING)
        async with _channels(f"127.0.0.1:{port}") as (channel,):
            stub = pb_grpc.NumberGroupServiceStub(channel)
            async with SandboxControl(rig.url) as control:
                pages = await collect_pages(stub, control, rig.url, UNARY_FILTER)
            call = list_call(stub, pages, UNARY_FILTER)
            for i in range(warmup):
                await call(i % len(pages))
            walls: list[int] = []
            for i in range(calls):
                started = time.perf_counter_ns()
                await call(i % len(pages))
                walls.append(time.perf_counter_ns() - started)
        if await server.stop() != 0:
            raise RuntimeError(f"the server did not stop cleanly:\n{server.tail()}")
        records = json.loads(out.read_text())[-calls:]
    return _medians(records, walls)


def _medians(records: list[dict[str, int]], walls: list[int]) -> dict[str, Any]:
    # Every call meets every stage; a record without one (none is expected) is left out.
    stages = [s for s in STAGES if sum(s in r for r in records) > len(records) // 2]
    records = [r for r in records if all(s in r for s in stages)]
    steps = {
        later: statistics.median(r[later] - r[earlier] for r in records) / 1000
        for earlier, later in itertools.pairwise(stages)
    }
    server = statistics.median(r[stages[-1]] - r[stages[0]] for r in records) / 1000
    wall = statistics.median(walls) / 1000
    return {
        "calls": len(records),
        "concurrency": 1,
        "median_us_since_previous_stage": steps,
        "server_median_us": server,
        "client_wall_median_us": wall,
        "outside_python_median_us": statistics.median(
            w / 1000 - (r[stages[-1]] - r[stages[0]]) / 1000
            for r, w in zip(records, walls, strict=True)
        ),
    }


def render(result: dict[str, Any]) -> str:
    """One line per stage: the median since the stage before it, and its share of the wall."""
    wall = result["client_wall_median_us"]
    lines = [
        f"ListNumberGroups, concurrency 1, {result['calls']:,} calls; medians in microseconds",
        f"{'stage':<20}{'since previous':>16}{'share of wall':>15}",
    ]
    for stage, us in result["median_us_since_previous_stage"].items():
        lines.append(f"{stage:<20}{us:>16.0f}{us / wall:>15.1%}")
    lines += [
        f"{'server: received->sent':<20}{result['server_median_us']:>16.0f}",
        f"{'client wall time':<20}{wall:>16.0f}",
        f"{'wall - server (per call)':<20}{result['outside_python_median_us']:>12.0f}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the stages; or, as `serve ...`, run the instrumented server."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        return _serve(args[1:])
    parser = argparse.ArgumentParser(
        prog="python -m bench.stages", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--calls", type=int, default=3_000, help="timed calls (concurrency 1)")
    parser.add_argument("--warmup", type=int, default=300, help="calls before the timed ones")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    add_server_env(parser, "the server")
    options = parser.parse_args(args)
    return finish(
        lambda: measure(options.calls, options.warmup, options.server_env),
        render,
        options.json,
        "the stage timing",
    )


if __name__ == "__main__":
    sys.exit(main())
