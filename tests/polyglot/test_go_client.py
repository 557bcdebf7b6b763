"""The Go client (`clients/go`, grpc-go on stubs generated from protos/) against a real server.

It lists a typed page, streams the whole search, rents and repeats the rent, prints Money as
exact decimals and decodes ErrorInfo, BadRequest and RetryInfo with
`status.FromError(err).Details()`; `typed_clients.check_client` compares all of it with what
the Python client sees on the same server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from numbersvc.sandbox import SandboxControl
from tests.polyglot.conftest import BUILD_TIMEOUT_SECONDS, ROOT, build_client
from tests.polyglot.typed_clients import check_client, check_docs

# The first test may build the client, when pytest runs without `make clients` first.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 60)


_BINARY = "clients/go/build/bin/numbersvc-check"


@pytest.fixture(scope="session")
def go_client() -> list[str | Path]:
    """The Go client's command, built once per session (by `make clients` in `make test`)."""
    build_client("clients-go", "go")
    return [ROOT / _BINARY]


async def test_go_client_sees_what_python_sees(
    go_client: list[str | Path], port: int, control: SandboxControl
) -> None:
    await check_client(go_client, port, control)


def test_the_documented_go_commands_are_what_make_clients_runs() -> None:
    check_docs("Go", "clients/go", _BINARY, _BINARY)
