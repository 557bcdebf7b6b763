"""The Java client (`clients/java`, grpc-java on stubs from protoc) against a real server.

It lists a typed page, streams the whole search, rents and repeats the rent, prints Money as
exact decimals and decodes ErrorInfo, BadRequest and RetryInfo with
`StatusProto.fromThrowable`; `typed_clients.check_client` compares all of it with what the
Python client sees on the same server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from numbersvc.sandbox import SandboxControl
from tests.polyglot.conftest import BUILD_TIMEOUT_SECONDS, ROOT, build_client
from tests.polyglot.typed_clients import check_client, check_docs

# The first test may build the client, when pytest runs without `make clients` first.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 60)


_JAR = "clients/java/target/numbersvc-check.jar"


@pytest.fixture(scope="session")
def java_client() -> list[str | Path]:
    """The Java client's command, built once per session (by `make clients` in `make test`)."""
    build_client("clients-java", "mvn", "java")
    java = shutil.which("java")
    assert java is not None
    return [java, "-jar", ROOT / _JAR]


async def test_java_client_sees_what_python_sees(
    java_client: list[str | Path], port: int, control: SandboxControl
) -> None:
    await check_client(java_client, port, control)


def test_the_documented_java_commands_are_what_make_clients_runs() -> None:
    check_docs("Java", "clients/java", _JAR, f"java -jar {_JAR}")
