"""The upstream HTTP stacks compared as clients, side by side: `make bench-transports`.

    python -m bench.transports [--quick] [--json PATH]

Why numbersvc runs httpx over aiohttp: the same REST call (a sandbox search page, body read,
JSON decoded) made at concurrency 32 from this process by each candidate, in alternating
phases against one sandbox, with the client process's CPU per call beside calls per second and
latency. aiohttp on its own is the baseline (the fastest Python client, and the one row 1 and 2
of `bench.bench` compare the service with); every other stack is a ratio to it. The service's
own A/B of the two stacks is `python -m bench.ab --b NUMBERSVC_UPSTREAM_HTTP_STACK=httpcore`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from bench.bench import (
    CALL_TIMEOUT_SECONDS,
    CONCURRENCY,
    Direct,
    Phase,
    cpu_ms_per_call,
    direct_call,
    disjoint_assignments,
    finish,
    latency_ms,
    rate,
    run_phase,
    unary_page_urls,
    unary_rig,
)
from numbersvc.config import Config
from numbersvc.sandbox import DEFAULT_AUTH_ID, DEFAULT_AUTH_TOKEN
from numbersvc.upstream.client import (
    DEFAULT_KEEPALIVE_EXPIRY_SECONDS,
    DEFAULT_USER_AGENT,
    http_client,
)
from numbersvc.upstream.transport import HttpStack, build_transport

__all__ = ["Options", "main", "run_transports"]

_CLIENT: Final = "client"
Get = Callable[[str], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Options:
    """How long to measure."""

    rounds: int = 8  # of one phase per stack
    seconds: float = 2.0  # per phase
    warmup_calls: int = 300  # per stack


def _httpx_get(client: httpx.AsyncClient) -> Get:
    async def get(url: str) -> dict[str, Any]:
        response = await client.get(url, timeout=CALL_TIMEOUT_SECONDS)
        if response.status_code != 200:
            raise RuntimeError(f"GET {url}: HTTP {response.status_code}")
        data: dict[str, Any] = json.loads(response.content)
        return data

    return get


def _client(transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
    return http_client(
        auth_id=DEFAULT_AUTH_ID,
        auth_token=DEFAULT_AUTH_TOKEN,
        user_agent=DEFAULT_USER_AGENT,
        transport=transport,
    )


def _stacks() -> dict[str, Callable[[], httpx.AsyncClient]]:
    """The httpx candidates: `PlivoClient`'s client on each stack as `numbersvc serve` sets
    it up (the pool size from the shipped config, every connection kept alive), and on httpx's
    own transport with httpx's default limits."""
    pool = Config().upstream_max_connections

    def shipped(stack: HttpStack) -> Callable[[], httpx.AsyncClient]:
        transport = functools.partial(
            build_transport,
            stack,
            max_connections=pool,
            max_keepalive_connections=pool,
            keepalive_expiry_seconds=DEFAULT_KEEPALIVE_EXPIRY_SECONDS,
        )
        return lambda: _client(transport())

    return {
        f"httpx + aiohttp, as shipped (pool of {pool})": shipped(HttpStack.AIOHTTP),
        f"httpx + httpcore, as shipped (pool of {pool})": shipped(HttpStack.HTTPCORE),
        "httpx + httpcore, httpx's default limits": lambda: _client(
            httpx.AsyncHTTPTransport(trust_env=False)
        ),
    }


async def run_transports(options: Options) -> dict[str, Any]:
    """Start and seed a sandbox, measure every stack against it, stop it."""
    async with unary_rig("bench-transports-") as rig:
        urls = unary_page_urls(rig.url)
        clients = {name: make() for name, make in _stacks().items()}
        direct = Direct(rig.url)
        try:
            gets: dict[str, Get] = {"aiohttp alone (baseline)": direct.get}
            gets.update({name: _httpx_get(client) for name, client in clients.items()})
            return await _measure(options, gets, urls)
        finally:
            await direct.aclose()
            for client in clients.values():
                await client.aclose()


async def _measure(
    options: Options, gets: Mapping[str, Get], urls: Sequence[str]
) -> dict[str, Any]:
    calls = {name: direct_call(get, urls) for name, get in gets.items()}
    assignments = disjoint_assignments(len(urls), CONCURRENCY)
    pids = {_CLIENT: os.getpid()}
    for call in calls.values():
        await run_phase(call, assignments, options.warmup_calls, {})
    phases: dict[str, list[Phase]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(options.rounds):
        # Rotate the order each round so that no stack always follows the same one.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            phase = await run_phase(calls[name], assignments, 10**9, pids, seconds=options.seconds)
            phases[name].append(phase)
    result: dict[str, Any] = {
        "rounds": options.rounds,
        "seconds_per_phase": options.seconds,
        "concurrency": CONCURRENCY,
        "stacks": {},
    }
    for name, done in phases.items():
        result["stacks"][name] = {
            "calls_per_second": rate(done),
            "ms": latency_ms(done),
            "client_cpu_ms_per_call": cpu_ms_per_call(done, _CLIENT),
        }
    return result


def render(result: Mapping[str, Any]) -> str:
    """One line per stack, with its ratio to the aiohttp baseline."""
    stacks = result["stacks"]
    base = next(iter(stacks.values()))
    lines = [
        f"c={result['concurrency']}, {result['rounds']} rotating phases of"
        f" {result['seconds_per_phase']:g} s per stack; one sandbox; CPU is this client process's",
        f"{'stack':<50}{'calls/s':>9}{'ratio':>7}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'CPU ms/call':>12}{'ratio':>7}",
    ]
    for name, s in stacks.items():
        rate, cpu = s["calls_per_second"], s["client_cpu_ms_per_call"]
        lines.append(
            f"{name:<50}{rate:>9,.0f}{rate / base['calls_per_second']:>7.2f}"
            f"{s['ms']['p50']:>8.2f}{s['ms']['p99']:>8.2f}"
            f"{cpu:>12.3f}{cpu / base['client_cpu_ms_per_call']:>7.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, measure, print; 2 when it fails."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.transports", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer and shorter phases")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    options = Options()
    if args.quick:
        options = dataclasses.replace(options, rounds=3, seconds=1.0, warmup_calls=100)
    return finish(lambda: run_transports(options), render, args.json, "the transport comparison")


if __name__ == "__main__":
    sys.exit(main())
