"""Row 12 of `bench/bench.py`: the server's CPU per call with tracing exporting vs off.

Two servers on the bench's sandbox, started side by side with the same settings: one without
OpenTelemetry variables (tracing off, as shipped), one exporting every span
(`OTEL_TRACES_SAMPLER=always_on`) over OTLP/gRPC to a real receiver in a process of its own
(`python -m tests.otlp`). Both take a permit from a request budget for every upstream
request, as shipped, from one too large to ever wait (`NUMBERSVC_UPSTREAM_RATE=1000000/1s`)
so that it does not pace the load (a permit had at once makes no span: only waits do).
Phases of ListNumberGroups calls at concurrency 32 alternate between them (which goes first
alternates too); each phase's figure is that server's utime+stime (/proc/PID/stat) over its
calls. The ratio on/off is the row; issue 13's target is at most 1.25x. The receiver's span
count afterwards proves the spans were exported.

NOTE: `bench.bench` imports this module only when row 12 runs, and this module imports
`bench.bench` for its process and load helpers; under `python -m bench.bench` that loads a
second copy of it (the first is `__main__`), which only costs its import.
"""

from __future__ import annotations

import re
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
    calls = 5 * plan.cpu_calls
    phases: dict[str, list[core.Phase]] = {"off": [], "on": []}
    async with (
        core._server(bench, procs, "server-tracing-off", rate_off=False, env=common) as off,
        core._server(bench, procs, "server-tracing-on", rate_off=False, env=exporting) as on,
        core._channels(off[1]) as (off_channel,),
        core._channels(on[1]) as (on_channel,),
    ):
        sides = {}
        for name, (server, _), channel in (("off", off, off_channel), ("on", on, on_channel)):
            stub = pb_grpc.NumberGroupServiceStub(channel)
            pages = await core.collect_pages(stub, control, direct.base_url, core.UNARY_FILTER)
            call = core.list_call(stub, pages, core.UNARY_FILTER)
            assignments = core.disjoint_assignments(len(pages), core.CONCURRENCY)
            await core.run_phase(call, assignments, plan.warmup_calls, {})
            sides[name] = (call, assignments, server.pid)
        core._progress(f"row 12: {plan.cpu_rounds} x {calls} calls per side, tracing on and off")
        for r in range(plan.cpu_rounds):
            for name in ("off", "on") if r % 2 == 0 else ("on", "off"):
                call, assignments, pid = sides[name]
                phases[name].append(await core.run_phase(call, assignments, calls, {name: pid}))
    # The traced server has stopped, its last spans flushed: now the receiver counts them.
    await collector.stop()
    procs.children.remove(collector)
    counted = _SPANS.search(collector.log())
    spans = int(counted.group(1)) if counted else 0
    measured = sum(p.calls for p in phases["on"])
    if spans < _SPANS_PER_CALL * measured:
        raise RuntimeError(f"row 12: the receiver got {spans} spans for {measured} traced calls")
    off_ms = core.cpu_ms_per_call(phases["off"], "off")
    on_ms = core.cpu_ms_per_call(phases["on"], "on")
    ratio = on_ms / off_ms
    bench.figures["12_tracing"] = {
        "concurrency": core.CONCURRENCY,
        "rounds": plan.cpu_rounds,
        "calls_per_phase": calls,
        "off_cpu_ms_per_call": off_ms,
        "on_cpu_ms_per_call": on_ms,
        "ratio": ratio,
        "spans_received": spans,
        "off_round_cpu_ms_per_call": [1000 * p.cpu["off"] / p.calls for p in phases["off"]],
        "on_round_cpu_ms_per_call": [1000 * p.cpu["on"] / p.calls for p in phases["on"]],
        "off_ms": core.latency_ms(phases["off"]),
        "on_ms": core.latency_ms(phases["on"]),
    }
    bench.rows.append(
        core.Row(
            f"12 CPU per call, tracing exporting, c={core.CONCURRENCY}",
            f"off {off_ms:.3f} ms",
            f"on {on_ms:.3f} ms ({spans:,} spans received)",
            f"{ratio:.2f}x",
            f"<= {TARGET:.2f}x",
            ratio <= TARGET,
        )
    )
