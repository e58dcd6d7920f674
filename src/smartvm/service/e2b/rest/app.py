"""``smartvm serve``'s ASGI app with both E2B faces on the service's one port.

The native ``/v1`` API and the E2B REST routes are one FastAPI app (one set of API keys, one body
limit, one set of metrics); the envd face sits in front of it and takes the requests that name a
sandbox (``E2b-Sandbox-Id`` or a ``49983-<id>.`` Host), so ``/files`` uploads stream past the JSON
body limit. The E2B SDK then needs only ``E2B_API_URL`` and ``E2B_SANDBOX_URL`` set to the service's
URL (and ``E2B_API_KEY``).
"""

from __future__ import annotations

from fastapi import APIRouter

from smartvm.service.app import create_app
from smartvm.service.context import ServiceContext
from smartvm.service.e2b.app import EnvdMiddleware, Message, Receive, Scope, Send
from smartvm.service.e2b.rest.face import E2BFace
from smartvm.service.routes import native_routers


def e2b_routers() -> list[APIRouter]:
    from smartvm.service.e2b.rest import legacy, routes

    return [legacy.router, routes.router]  # legacy first: /sandboxes/metrics before /sandboxes/{id}


class ServiceApp:
    """The service with its E2B faces. Call :meth:`aclose` once the server stopped (an ASGI lifespan
    shutdown does it too): it stops envd watchers and closes the access token store."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.face = E2BFace(ctx)
        self.api = create_app(ctx, routers=[*native_routers(), *e2b_routers()])
        self.api.state.e2b = self.face
        self._front = EnvdMiddleware(self.api, self.face.resolve)
        self.face.envd = self._front.envd
        self._closed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self._front(scope, receive, send)
            return

        async def closing(receive: Receive = receive) -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.aclose()
            return message

        await self.api(scope, closing, send)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.face.envd is not None:
                await self.face.envd.aclose()
        finally:
            self.face.close()


def service_app(ctx: ServiceContext) -> ServiceApp:
    """The app ``smartvm serve`` runs: native API, E2B REST and envd faces over ``ctx``."""
    return ServiceApp(ctx)
