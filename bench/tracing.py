"""Row 12 of `bench/bench.py`: the server's CPU per call with tracing exporting vs off.

Two servers on the bench's sandbox, started side by side with the same settings: one without
OpenTelemetry variables (tracing off, as shipped), one exporting every span
(`OTEL_TRACES_SAMPLER=always_on`) over OTLP/gRPC to a real receiver in a process of its own
(`python -m tests.otlp`). Both take a permit from a request budget for every upstream
request, as shipped, from one too large to ever wait (`NUMBERSVC_UPSTREAM_RATE=1000000/1s`)
so that it does not pace the load (a permit had at once makes no span: only waits do).
Phases of ListNumberGroups calls at concurrency 32 alternate between them (which goes first
alternates too), in many short rounds (256 calls a side) so that the machine's other load
falls on both sides.

What a server's round costs is its utime+stime (/proc/PID/stat, every thread) from the start of
its phase to the start of its next one (after the last, to the end of a settling wait): the
traced server's batch processor sends its spans 512 at a time, on its own thread, and may
still be sending a phase's last batch, or hold spans queued, when the phase's last call has
returned: they go out during the other side's phase or at the processor's timer. Counted over
the phase alone they would be missed or land in another round; over the cycle they are in.
Both sides are counted over the same kind of window, so the idle cost of a server is on both
(the off server's CPU over the last settling wait, `settle_cpu_ms_per_s`, is that cost; the
traced one's adds its last spans' export).
Before the first round and after the last, the bench waits out the processor's schedule delay,
so that the warm-up's spans are not counted and the last round's all are.

The row is the median over rounds of the round's ratio on/off (issue 13's target is at most
1.25x); the JSON keeps every round's figures and the ratio of the totals. A round's ratio is
noisy on a shared machine (other processes take the cores for a phase or two); the median
keeps one disturbed round from deciding the row. The receiver's span count afterwards proves
the spans were exported.

NOTE: `bench.bench` imports this module only when row 12 runs, and this module imports
`bench.bench` for its process and load helpers; under `python -m bench.bench` that loads a
second copy of it (the first is `__main__`), which only costs its import.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import statistics
import sys
from typing import Final

from bench import bench as core
from numbersvc.sandbox import SandboxControl
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc

__all__ = ["TARGET", "row"]

TARGET: Final = 1.25
_BUDGET_NEVER_WAITS: Final = "1000000/1s"
_COLLECTOR_READY: Final = re.compile(r"otlp grpc 127\.0\.0\.1:(\d+)")
_SPANS: Final = re.compile(r"^spans (\d+)$", re.MULTILINE)
# A call's spans with tracing on: the server's and its upstream request's.
_SPANS_PER_CALL: Final = 2
# The SDK's batch processor sends what is queued at least this often (its default, 5 s), plus
# a margin for the send itself.
_SETTLE_SECONDS: Final = 5.0 + 1.0
# Row 12's rounds, as a multiple of the plan's CPU rows' (row 6's): quick 30, full 50. Short
# phases, many of them: the other load moves a round's ratio by about 0.15x (its standard
# deviation), and the median of n rounds moves as 1/sqrt(n) of that.
_ROUNDS_PER_CPU_ROUND: Final = 10
# The batch processor sends a batch whenever 512 spans are queued (the SDK's default batch): a
# phase of 256 calls queues one on average (the 5 s timer sends a partial one now and then),
# so that a round seldom counts a batch more or less than its own spans. (With 600 calls, a
# round sent 2 or 3 batches, and the median round was a 2-batch one: the exporter's cost
# undercounted by 15%.)
_CALLS_PER_PHASE: Final = 512 // _SPANS_PER_CALL


async def row(
    bench: core.Bench, procs: core._Procs, control: SandboxControl, direct: core.Direct
) -> None:
    """Measure row 12 and add it to `bench`."""
    argv = (sys.executable, "-m", "tests.otlp")
    collector = core.Child("otlp-collector", argv, core._child_env({}), procs.log_dir)
    procs.children.append(collector)
    port = await collector.start(_COLLECTOR_READY)
    common = {"NUMBERSVC_UPSTREAM_RATE": _BUDGET_NEVER_WAITS}
    exporting = {
        **common,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    plan = bench.plan
    rounds = _ROUNDS_PER_CPU_ROUND * plan.cpu_rounds
    calls = _CALLS_PER_PHASE
    phases: dict[str, list[core.Phase]] = {"off": [], "on": []}
    marks: dict[str, list[float]] = {"off": [], "on": []}  # CPU seconds at each phase's start
    async with (
        core._server(bench, procs, "server-tracing-off", rate_off=False, env=common) as off,
        core._server(bench, procs, "server-tracing-on", rate_off=False, env=exporting) as on,
        core._channels(off[1]) as (off_channel,),
        core._channels(on[1]) as (on_channel,),
    ):
        sides, warm = {}, {}
        for name, (server, _), channel in (("off", off, off_channel), ("on", on, on_channel)):
            stub = pb_grpc.NumberGroupServiceStub(channel)
            pages = await core.collect_pages(stub, control, direct.base_url, core.UNARY_FILTER)
            call = core.list_call(stub, pages, core.UNARY_FILTER)
            assignments = core.disjoint_assignments(len(pages), core.CONCURRENCY)
            warm[name] = (await core.run_phase(call, assignments, plan.warmup_calls, {})).calls
            sides[name] = (call, assignments, server.pid)
        core._progress(f"row 12: {rounds} x {calls} calls per side, tracing on and off")
        await asyncio.sleep(_SETTLE_SECONDS)  # the warm-up's spans leave before any mark
        for r in range(rounds):
            for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
                call, assignments, pid = sides[name]
                marks[name].append(core.cpu_seconds(pid))
                phases[name].append(await core.run_phase(call, assignments, calls, {}))
        settled = {name: core.cpu_seconds(side[2]) for name, side in sides.items()}
        await asyncio.sleep(_SETTLE_SECONDS)  # the last round's spans leave, and are counted
        for name, side in sides.items():
            marks[name].append(core.cpu_seconds(side[2]))
    settling = {name: (marks[name][-1] - settled[name]) / _SETTLE_SECONDS for name in sides}
    # The traced server has stopped, its last spans flushed: now the receiver counts them.
    await collector.stop()
    procs.children.remove(collector)
    counted = _SPANS.search(collector.log())
    spans = int(counted.group(1)) if counted else 0
    # The warm-up's calls are traced too: counted, or a shortfall as large would go unseen.
    measured = sum(p.calls for p in phases["on"])
    if spans < _SPANS_PER_CALL * (measured + warm["on"]):
        raise RuntimeError(f"row 12: the receiver got {spans} spans for {measured} traced calls")
    per_call = {name: _round_ms_per_call(marks[name], phases[name]) for name in sides}
    ratios = [on / off for on, off in zip(per_call["on"], per_call["off"], strict=True)]
    ratio = statistics.median(ratios)
    off_ms, on_ms = (statistics.median(per_call[name]) for name in ("off", "on"))
    bench.figures["12_tracing"] = {
        "concurrency": core.CONCURRENCY,
        "rounds": rounds,
        "calls_per_phase": calls,
        "off_cpu_ms_per_call": off_ms,
        "on_cpu_ms_per_call": on_ms,
        "ratio": ratio,
        "round_ratios": ratios,
        "ratio_of_totals": _total_ms_per_call(marks["on"], phases["on"])
        / _total_ms_per_call(marks["off"], phases["off"]),
        "spans_received": spans,
        "off_round_cpu_ms_per_call": per_call["off"],
        "on_round_cpu_ms_per_call": per_call["on"],
        "settle_cpu_ms_per_s": {name: 1000 * cpu for name, cpu in settling.items()},
        "off_ms": core.latency_ms(phases["off"]),
        "on_ms": core.latency_ms(phases["on"]),
    }
    bench.rows.append(
        core.Row(
            f"12 CPU per call, tracing exporting, c={core.CONCURRENCY}",
            f"off {off_ms:.3f} ms",
            f"on {on_ms:.3f} ms ({spans:,} spans received)",
            f"{ratio:.2f}x (median of {rounds} rounds)",
            f"<= {TARGET:.2f}x",
            ratio <= TARGET,
        )
    )


def _round_ms_per_call(marks: list[float], phases: list[core.Phase]) -> list[float]:
    """Each round's CPU ms per call: from its phase's start to the next phase's (or the end)."""
    spans = itertools.pairwise(marks)
    return [1000 * (end - start) / p.calls for (start, end), p in zip(spans, phases, strict=True)]


def _total_ms_per_call(marks: list[float], phases: list[core.Phase]) -> float:
    return 1000 * (marks[-1] - marks[0]) / sum(p.calls for p in phases)
