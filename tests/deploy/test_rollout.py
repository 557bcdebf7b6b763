"""A rent in flight when a pod is stopped, with each overlay's own shutdown settings.

docs/deployment.md promises: in `ha`, a rent that arrives during the drain still gets the rent
timeout to learn its outcome, and its caller gets the order; in `single`, whose shutdown is an
outage, the server gives up on it sooner and records its outcome as unknown. Both stop before
the pod's terminationGracePeriodSeconds. Here `numbersvc serve` runs as a real process with the
env of the rendered overlay (only addresses and files made local: the gRPC and metrics ports
from the OS, the database URL's file or the ledger file in a temporary folder, the sandbox for
Plivo), on real PostgreSQL for `ha`. It gets SIGTERM; the rent arrives a second before the
drain ends, and the upstream answers it a few seconds before the rent timeout.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from numbersvc.sandbox import DEFAULT_AUTH_ID, DEFAULT_AUTH_TOKEN, SandboxControl, SandboxServer
from numbersvc.sandbox.faults import FaultKind, FaultSpec
from numbersvc.v1 import number_groups_pb2 as pb
from numbersvc.v1 import number_groups_pb2_grpc as pb_grpc
from tests.deploy.kustomize import env_literals, overlay_dir, render, secret_file
from tests.deploy.test_manifests import config_of
from tests.e2e.conftest import reason_of
from tests.e2e.test_process import Served, _start

_UPSTREAM_MARGIN_SECONDS: Final = 5.0  # the upstream answers this long before the rent timeout
_BEFORE_DRAIN_ENDS_SECONDS: Final = 1.0  # the rent arrives this long before the drain ends
_DATABASE_URL_FILE: Final = "NUMBERSVC_DATABASE_URL_FILE"
_LEDGER_PATH: Final = "NUMBERSVC_LEDGER_PATH"


@dataclass(frozen=True)
class Stopped:
    """What the rent's caller got, and how the process ended after SIGTERM."""

    outcome: str  # the order's status, or the error's ErrorInfo reason
    exit_code: int
    seconds: float  # from SIGTERM to the process's exit
    termination_grace_seconds: int  # the pod's


async def stop_during_a_rent(overlay: str, folder: Path, database_url: str = "") -> Stopped:
    """Serve with `overlay`'s env, SIGTERM, rent just before the drain ends, wait for the exit."""
    rendered = render(overlay_dir(overlay))
    config = config_of(rendered.container)
    env = env_literals(rendered.container)
    del env["NUMBERSVC_LISTEN"]  # `_start` listens on a port from the OS
    if _DATABASE_URL_FILE in env:  # the Secret's file, where the Deployment mounts it
        _, key = secret_file(rendered.deployment, env[_DATABASE_URL_FILE])
        (folder / key).write_text(database_url)
        env[_DATABASE_URL_FILE] = str(folder / key)
    if _LEDGER_PATH in env:
        env[_LEDGER_PATH] = str(folder / "ledger.sqlite3")
    async with (
        SandboxServer(host="127.0.0.1", port=0) as sandbox,
        SandboxControl(sandbox.base_url) as control,
    ):
        env |= {
            "NUMBERSVC_METRICS_LISTEN": "127.0.0.1:0",
            "PLIVO_BASE_URL": sandbox.base_url,
            "PLIVO_AUTH_ID": DEFAULT_AUTH_ID,
            "PLIVO_AUTH_TOKEN": DEFAULT_AUTH_TOKEN,
        }
        served = Served(await _start(env))
        try:
            await served.wait_serving()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
                stub = pb_grpc.NumberGroupServiceStub(channel)
                page = await stub.ListNumberGroups(
                    pb.ListNumberGroupsRequest(filter=pb.SearchFilter(region_code="US"))
                )
                upstream_seconds = config.rent_timeout_seconds - _UPSTREAM_MARGIN_SECONDS
                await control.inject_fault(
                    FaultSpec(FaultKind.DELAY, seconds=upstream_seconds, operation="rent")
                )
                served.process.send_signal(signal.SIGTERM)
                stopped_at = time.monotonic()
                await asyncio.sleep(config.drain_seconds - _BEFORE_DRAIN_ENDS_SECONDS)
                request = pb.RentNumbersRequest(
                    group_id=page.number_groups[0].group_id, request_id=str(uuid.uuid4())
                )
                try:
                    rented = await stub.RentNumbers(
                        request, timeout=2 * config.rent_timeout_seconds
                    )
                    outcome = pb.OrderStatus.Name(rented.order.status)
                except grpc.aio.AioRpcError as error:
                    outcome = reason_of(error)
            exit_code = await served.finish()
            seconds = time.monotonic() - stopped_at
        finally:
            await served.close()
    grace: int = rendered.pod_spec["terminationGracePeriodSeconds"]
    return Stopped(outcome, exit_code, seconds, grace)


async def test_ha_answers_a_rent_sent_during_the_drain(postgres_url: str, tmp_path: Path) -> None:
    stopped = await stop_during_a_rent("ha", tmp_path, postgres_url)
    assert stopped.outcome == "ORDER_STATUS_FULFILLED"
    assert stopped.exit_code == 0
    assert stopped.seconds < stopped.termination_grace_seconds


async def test_single_gives_it_up_as_outcome_unknown_sooner(tmp_path: Path) -> None:
    stopped = await stop_during_a_rent("single", tmp_path)
    assert stopped.outcome == "RENT_OUTCOME_UNKNOWN"
    assert stopped.exit_code == 0
    assert stopped.seconds < stopped.termination_grace_seconds
