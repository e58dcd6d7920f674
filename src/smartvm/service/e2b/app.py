"""The envd face as one ASGI app: sandbox routing, the access token, then envd's routes.

``EnvdApp(resolver)`` serves ``/health``, ``/files``, ``/process.Process/*`` and
``/filesystem.Filesystem/*`` for every sandbox the resolver knows. ``EnvdMiddleware(app, resolver)``
puts it in front of another ASGI app (the service's REST API) on the same port: requests that name a
sandbox (``E2b-Sandbox-Id`` or a ``<port>-<id>.`` Host) go to envd, all others to ``app``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.routing import Route, Router

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.service.e2b import binding as b
from smartvm.service.e2b import files_http
from smartvm.service.e2b.errors import (
    connect_error_response,
    http_error,
    http_error_for,
    not_found_message,
    to_connect,
)
from smartvm.service.e2b.filesystem import FilesystemService
from smartvm.service.e2b.gen.filesystem.filesystem_connect import FilesystemASGIApplication
from smartvm.service.e2b.gen.process.process_connect import ProcessASGIApplication
from smartvm.service.e2b.process import ProcessService

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: the envd version whose SDK features this face implements (the REST face reports it as envdVersion):
#: default user (0.4.0), stdin control and CloseStdin (0.5.2), octet-stream and gzip uploads (0.5.7)
ENVD_VERSION = "0.5.7"
_RPC_PREFIXES = ("/process.Process/", "/filesystem.Filesystem/")


class ErrorInterceptor:
    """smartvm errors of every handler as Connect errors (:func:`errors.to_connect`), in one place."""

    async def intercept_unary(
        self, call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]], request: Any, ctx: Any, /
    ) -> Any:
        try:
            return await call_next(request, ctx)
        except SmartVMError as exc:
            raise to_connect(exc) from None

    async def intercept_client_stream(
        self, call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]], request: Any, ctx: Any, /
    ) -> Any:
        return await self.intercept_unary(call_next, request, ctx)

    async def intercept_server_stream(
        self,
        call_next: Callable[[Any, RequestContext[Any, Any]], AsyncIterator[Any]],
        request: Any,
        ctx: Any,
        /,
    ) -> AsyncIterator[Any]:
        stream = call_next(request, ctx)
        try:
            async for item in stream:
                yield item
        except SmartVMError as exc:
            raise to_connect(exc) from None
        finally:  # the handler's finally blocks run now (as connectrpc does for this wrapper), not at GC
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()


class DeadlineInterceptor:
    """Connect-Timeout-Ms for unary and client-stream calls (server streams check it themselves)."""

    async def intercept_unary(
        self, call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]], request: Any, ctx: Any, /
    ) -> Any:
        return await _within(ctx, call_next(request, ctx))

    async def intercept_client_stream(
        self, call_next: Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]], request: Any, ctx: Any, /
    ) -> Any:
        return await _within(ctx, call_next(request, ctx))


async def _within(ctx: RequestContext[Any, Any], call: Awaitable[Any]) -> Any:
    remaining = ctx.timeout_ms
    if remaining is None:
        return await call
    try:
        async with asyncio.timeout(remaining / 1000):
            return await call
    except TimeoutError:
        raise ConnectError(Code.DEADLINE_EXCEEDED, "the request's Connect-Timeout-Ms passed") from None


class EnvdApp:
    """envd for many sandboxes on one port. Call :meth:`aclose` on shutdown (stops watchers)."""

    def __init__(self, resolver: b.Resolver) -> None:
        self._resolver = resolver
        interceptors = (DeadlineInterceptor(), ErrorInterceptor())
        self.homes = b.UserHomes()
        self.filesystem = FilesystemService()
        self._process = ProcessASGIApplication(ProcessService(), interceptors=interceptors)
        self._filesystem = FilesystemASGIApplication(self.filesystem, interceptors=interceptors)
        self._http = Router(
            routes=[
                Route("/health", files_http.health, methods=["GET"]),
                Route("/files", files_http.download, methods=["GET"]),
                Route("/files", files_http.upload, methods=["POST"]),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send, self.aclose)
                return
            await Response(status_code=404)(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        rpc = path.startswith(_RPC_PREFIXES)
        sandbox_id = b.sandbox_id_of(headers)
        admitted = await self._admit(sandbox_id, headers, path, rpc)
        if isinstance(admitted, Response):
            await admitted(scope, receive, send)
            return
        assert sandbox_id is not None
        request = b.Request(sandbox_id, admitted, self.homes)

        async def watched() -> Message:  # lets silent streams notice a client that went away
            message = await receive()
            if message["type"] == "http.disconnect":
                request.gone.set()
            return message

        token = b.bind(request)
        try:
            if path.startswith("/process.Process/"):
                await self._process(scope, watched, send)
            elif rpc:
                await self._filesystem(scope, watched, send)
            else:
                await self._http(scope, watched, send)
        finally:
            b.unbind(token)

    async def _admit(
        self, sandbox_id: str | None, headers: Headers, path: str, rpc: bool
    ) -> b.EnvdBinding | Response:
        """The request's sandbox binding, or the response that refuses it."""
        if not sandbox_id:
            return http_error(400, "name the sandbox with the E2b-Sandbox-Id header")
        try:
            binding = await b.resolve(self._resolver, sandbox_id)
        except SmartVMError as exc:
            if exc.code in (ErrorCode.SANDBOX_NOT_FOUND, ErrorCode.VM_NOT_FOUND):
                binding = None
            else:
                return http_error_for(exc)
        if binding is None:
            return http_error(502, not_found_message(sandbox_id))
        if path != "/health" and not b.token_ok(binding, headers.get(b.ACCESS_TOKEN_HEADER)):
            message = f"the X-Access-Token is not the access token of sandbox {sandbox_id}"
            return connect_error_response(Code.UNAUTHENTICATED, message) if rpc else http_error(401, message)
        return binding

    async def aclose(self) -> None:
        await self.filesystem.close()


class EnvdMiddleware:
    """Send requests that name a sandbox to an :class:`EnvdApp`, everything else to `app`."""

    def __init__(self, app: ASGIApp, resolver: b.Resolver) -> None:
        self.app = app
        self.envd = EnvdApp(resolver)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and b.sandbox_id_of(Headers(scope=scope)):
            await self.envd(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def _lifespan(receive: Receive, send: Send, shutdown: Callable[[], Awaitable[None]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
