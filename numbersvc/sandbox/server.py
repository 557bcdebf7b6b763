"""Running the sandbox: :class:`SandboxServer` for tests, :func:`run_sandbox` for the CLI.

Binds a real TCP port (port 0 picks a free one), so clients under test go through the same
sockets, pools and timeouts they use against Plivo.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from aiohttp import web

from numbersvc.sandbox.app import CONTROL_PREFIX, STATE, create_app
from numbersvc.sandbox.inventory import DEFAULT_SEED, Inventory

__all__ = [
    "DEFAULT_AUTH_ID",
    "DEFAULT_AUTH_TOKEN",
    "DEFAULT_SEED",
    "SandboxServer",
    "run_sandbox",
]

#: The sandbox account's Auth ID: 20 characters starting ``MA``, like a real main account.
DEFAULT_AUTH_ID = "MASANDBOX00000000000"
#: The sandbox account's Auth Token.
DEFAULT_AUTH_TOKEN = "sandbox-auth-token-0123456789abcdef"
#: Seconds aiohttp waits for in-flight handlers on stop; held connections are dropped before.
_SHUTDOWN_TIMEOUT_SECONDS = 2.0
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}

logger = logging.getLogger("numbersvc.sandbox")


class SandboxServer:
    """A Plivo-compatible HTTP server on a real port, usable as an async context manager.

    ``inventory`` exists from construction (seeded), so tests may inspect or tune it before
    :meth:`start`; it survives :meth:`stop`, and a stopped server may be started again.

    Example::

        async with SandboxServer(port=0) as sandbox:
            httpx.get(f"{sandbox.base_url}/v1/Account/{sandbox.auth_id}/AvailableNumberGroup/")
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        auth_id: str = DEFAULT_AUTH_ID,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        seed: int = DEFAULT_SEED,
    ) -> None:
        self.host = host
        self.auth_id = auth_id
        self.auth_token = auth_token
        self.inventory = Inventory(seed)
        self._requested_port = port
        self._port: int | None = None
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        """The bound TCP port.

        Raises:
            RuntimeError: If the server is not running.
        """
        if self._port is None:
            raise RuntimeError("the sandbox is not running: call start() first")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://host:port``: no trailing slash, no path (Plivo's paths start ``/v1/``)."""
        host = _WILDCARD_HOSTS.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def control_url(self) -> str:
        """The base URL of the control routes (``{base_url}/__sandbox``)."""
        return f"{self.base_url}{CONTROL_PREFIX}"

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            RuntimeError: If already running.
            OSError: If the address cannot be bound.
        """
        if self._runner is not None:
            raise RuntimeError("the sandbox is already running")
        app = create_app(self.inventory, auth_id=self.auth_id, auth_token=self.auth_token)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_SECONDS)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        logger.info("Plivo sandbox listening on %s (seed %d)", self.base_url, self.inventory.seed)

    async def stop(self) -> None:
        """Stop serving; idempotent. Connections held by faults are dropped, not waited for."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        app = runner.app
        # Release held connections first: aiohttp's own shutdown would wait for them.
        app[STATE].closing.set()
        await runner.cleanup()
        self._port = None
        logger.info("Plivo sandbox stopped")

    async def __aenter__(self) -> SandboxServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


async def run_sandbox(host: str, port: int, *, seed: int) -> None:
    """Serve the sandbox until cancelled, logging the URL and the credentials to use.

    Args:
        host: Address to bind (``127.0.0.1`` keeps it local).
        port: TCP port; 0 picks a free one (logged).
        seed: Seed of the inventory and of every id handed out.
    """
    async with SandboxServer(host, port, seed=seed) as sandbox:
        logger.info(
            "Plivo sandbox ready: base URL %s, auth id %s, auth token %s, "
            "control routes under %s/ (no auth)",
            sandbox.base_url,
            sandbox.auth_id,
            sandbox.auth_token,
            sandbox.control_url,
        )
        await asyncio.Event().wait()  # until the task is cancelled (Ctrl-C in the CLI)
