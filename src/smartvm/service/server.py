"""``smartvm serve``: the app on uvicorn, in this process, until SIGTERM or SIGINT.

Order of events: open the context (API keys, then the sandbox backend, which reconciles what a
previous run left) → listen → print the URL (the service is ready from the first connection on) →
serve → on SIGTERM/SIGINT stop listening, let requests in flight finish for up to
:data:`GRACE_S` seconds, then cancel what is left → close the backend (running sandboxes are kept,
paused or killed according to ``--on-exit``) → exit 0. Failing to start exits 2 with the error.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.service.backend import OnExit
from smartvm.service.context import ServiceContext, open_backend
from smartvm.service.e2b.rest import service_app

GRACE_S = 10


class _Server(uvicorn.Server):
    """uvicorn's server, announcing its URL once it listens and exiting 0 after a graceful stop."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[str], None]) -> None:
        super().__init__(config)
        self._announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            self._announce(self.url)

    @property
    def url(self) -> str:
        sock = self.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn's own version re-raises the signal after the graceful stop, which would turn a
        # clean shutdown into death by SIGTERM; ours only sets should_exit (twice SIGINT: force).
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _announce(url: str) -> None:
    print(f"smartvm serve: ready; API docs at {url}/docs, test page at {url}/test", file=sys.stderr)
    print(url, flush=True)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a clear error before any work.

    It is made with protocol IPPROTO_TCP, as asyncio makes its own: asyncio sets TCP_NODELAY only
    on connections of such sockets, and without it every response written in two parts (headers,
    then body) waits for the client's delayed ACK, 40 ms.
    """
    try:
        found = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = found[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise _cannot_listen(host, port, exc) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()
    except OSError as exc:
        sock.close()
        raise _cannot_listen(host, port, exc) from None
    return sock


def _cannot_listen(host: str, port: int, exc: OSError) -> SmartVMError:
    return SmartVMError(
        ErrorCode.INVALID_ARGUMENT,
        f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --host or --port",
    )


async def _serve(ctx: ServiceContext, sock: socket.socket, announce: Callable[[str], None]) -> None:
    app = service_app(ctx)  # the native API with the E2B REST and envd faces
    config = uvicorn.Config(
        app,
        lifespan="off",  # the context is opened here, before listening
        log_level="warning",
        timeout_graceful_shutdown=GRACE_S,
        ws="websockets-sansio",
    )
    await ctx.open()
    try:
        await _Server(config, announce).serve(sockets=[sock])
    finally:
        try:
            await app.aclose()
        finally:
            await ctx.close()


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 49999,
    data_dir: Path,
    on_exit: OnExit = "keep",
    engine: str = "auto",
    runtime_dir: Path | None = None,
    max_sandboxes: int | None = None,
    announce: Callable[[str], None] = _announce,
) -> None:
    """Run the service until a signal stops it. Raises SmartVMError when it cannot start.

    ``max_sandboxes`` caps the live sandboxes (default: SandboxSettings'); a create over it is
    answered 429 at once.
    """
    settings: dict[str, object] = {} if max_sandboxes is None else {"max_sandboxes": max_sandboxes}
    sock = bind(host, port)
    try:
        backend = open_backend(Path(data_dir), on_exit, engine=engine, runtime_dir=runtime_dir, **settings)
        ctx = ServiceContext(data_dir=Path(data_dir), backend=backend)
        asyncio.run(_serve(ctx, sock, announce))
    finally:
        sock.close()
