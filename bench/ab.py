"""A/B: two server processes that differ in their environment, measured side by side.

    python -m bench.ab --b NAME=VALUE [--b NAME=VALUE ...] [--a NAME=VALUE ...] [--quick]

For deciding on an optimization before anyone changes code or defaults: server A runs with
the shipped defaults (plus `--a`), server B with the same plus `--b` (a setting, or a
PYTHONPATH that puts a package in front: a copy of numbersvc too, and each side's output
says which numbersvc it ran). Both run with `NUMBERSVC_UPSTREAM_RATE=off` against
one sandbox, exactly as rows 1 and 2 of `bench.bench`, and the load alternates between them in
the same run: ListNumberGroups at concurrency 1 (interleaved call by call) and at concurrency 32
(12 alternating phases of 2 s: many short phases average the machine's noise out better than a
few long ones). Prints p50/p99 at concurrency 1, throughput and server CPU per call at
concurrency 32, for A and B and as B/A.

Calibrate first with an A/A run, `--b NUMBERSVC_SANDBOX_SEED=7` (a setting a server with a Plivo
upstream ignores), and `--b-first` to start B before A: a B/A inside the A/A spread is noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.bench import (
    CONCURRENCY,
    UNARY_FILTER,
    Child,
    Phase,
    _child_env,
    child_import_env,
    collect_pages,
    cpu_ms_per_call,
    disjoint_assignments,
    env_pair,
    finish,
    latency_ms,
    list_call,
    rate,
    run_phase,
    summary_ms,
    unary_rig,
)
from numbersvc.sandbox import SandboxControl
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

__all__ = ["Options", "main", "run_ab"]


@dataclass(frozen=True)
class Options:
    """What differs and how long to measure."""

    a_env: Mapping[str, str]
    b_env: Mapping[str, str]
    unary_calls: int = 1_000  # per server, concurrency 1
    rounds: int = 12  # of one phase per server, concurrency 32: short and many, against noise
    seconds: float = 2.0  # per phase
    warmup_calls: int = 300
    b_first: bool = False  # start server B before server A


async def run_ab(options: Options) -> dict[str, Any]:
    """Start the sandbox and both servers, measure them side by side, stop everything."""
    async with unary_rig("bench-ab-") as rig:
        order = [("a", options.a_env), ("b", options.b_env)]
        started: dict[str, tuple[Child, str]] = {}
        for name, extra in reversed(order) if options.b_first else order:
            started[name] = await rig.server(f"server-{name}", extra)
        targets = [started["a"], started["b"]]
        result = await _measure(options, rig.control, rig.url, targets)
        for name, extra in order:
            result[name]["numbersvc"] = numbersvc_source(extra, rig.log_dir)
        return result


def numbersvc_source(extra_env: Mapping[str, str], cwd: Path) -> str:
    """The numbersvc package a server started with `extra_env` runs: what an A/B compares."""
    probe = subprocess.run(
        [sys.executable, "-c", "import numbersvc; print(numbersvc.__file__)"],
        env=child_import_env(_child_env(extra_env)),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return str(Path(probe.stdout.strip()).parent)


async def _measure(
    options: Options, control: SandboxControl, url: str, targets: Sequence[tuple[Child, str]]
) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(target) for _, target in targets]
    try:
        stubs = [pb_grpc.NumberGroupServiceStub(channel) for channel in channels]
        pages = await collect_pages(stubs[0], control, url, UNARY_FILTER)
        calls = [list_call(stub, pages, UNARY_FILTER) for stub in stubs]
        assignments = disjoint_assignments(len(pages), CONCURRENCY)
        for call in calls:
            await run_phase(call, assignments, options.warmup_calls, {})
        unary: tuple[list[float], list[float]] = ([], [])
        for i in range(options.unary_calls):
            for k in (0, 1) if i % 2 == 0 else (1, 0):
                started = time.perf_counter()
                await calls[k](i % len(pages))
                unary[k].append(time.perf_counter() - started)
        phases: tuple[list[Phase], list[Phase]] = ([], [])
        for r in range(options.rounds):
            for k in (0, 1) if r % 2 == 0 else (1, 0):
                pids = {"server": targets[k][0].pid}
                phase = await run_phase(calls[k], assignments, 10**9, pids, seconds=options.seconds)
                phases[k].append(phase)
    finally:
        for channel in channels:
            await channel.close()
    result: dict[str, Any] = {
        "a_env": dict(options.a_env),
        "b_env": dict(options.b_env),
        "b_first": options.b_first,
        "rounds": options.rounds,
        "seconds_per_phase": options.seconds,
        "unary_calls": options.unary_calls,
    }
    for k, name in enumerate("ab"):
        result[name] = {
            "c1_ms": summary_ms(unary[k]),
            "c32_calls_per_second": rate(phases[k]),
            "c32_ms": latency_ms(phases[k]),
            "c32_server_cpu_ms_per_call": cpu_ms_per_call(phases[k], "server"),
            "c32_round_calls_per_second": [p.rate for p in phases[k]],
        }
    return result


def render(result: Mapping[str, Any]) -> str:
    """A, B and B/A, one line per figure."""
    a, b = result["a"], result["b"]
    rows = [
        ("c=1 p50 ms", a["c1_ms"]["p50"], b["c1_ms"]["p50"]),
        ("c=1 p99 ms", a["c1_ms"]["p99"], b["c1_ms"]["p99"]),
        ("c=32 calls/s", a["c32_calls_per_second"], b["c32_calls_per_second"]),
        ("c=32 p50 ms", a["c32_ms"]["p50"], b["c32_ms"]["p50"]),
        ("c=32 p99 ms", a["c32_ms"]["p99"], b["c32_ms"]["p99"]),
        (
            "c=32 server CPU ms/call",
            a["c32_server_cpu_ms_per_call"],
            b["c32_server_cpu_ms_per_call"],
        ),
    ]
    env = " ".join(f"{k}={v}" for k, v in result["b_env"].items())
    a_env = " ".join(f"{k}={v}" for k, v in result["a_env"].items())
    lines = [
        f"A: shipped defaults {a_env}".rstrip(),
        f"B: A + {env}" + (" (started first)" if result["b_first"] else ""),
        f"numbersvc: A runs {a['numbersvc']}, B runs {b['numbersvc']}"
        + (" (the same code)" if a["numbersvc"] == b["numbersvc"] else ""),
        f"c=1: {result['unary_calls']:,} calls each, interleaved; c=32: {result['rounds']}"
        f" alternating phases of {result['seconds_per_phase']:g} s each",
    ]
    lines.append(f"{'figure':<26}{'A':>10}{'B':>10}{'B/A':>8}")
    lines += [f"{name:<26}{x:>10.2f}{y:>10.2f}{y / x:>8.3f}" for name, x, y in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run the A/B, print it; 2 when it fails."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--a", type=env_pair, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--b", type=env_pair, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument("--b-first", action="store_true", help="start server B before A")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    options = Options(a_env=dict(args.a), b_env=dict(args.b), b_first=args.b_first)
    if args.quick:
        options = dataclasses.replace(options, unary_calls=300, rounds=4, warmup_calls=100)
    return finish(lambda: run_ab(options), render, args.json, "A/B")


if __name__ == "__main__":
    sys.exit(main())
