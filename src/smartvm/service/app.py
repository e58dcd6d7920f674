"""The FastAPI app: one factory, one place where routers are mounted, one error mapping.

Faces of the service (the native ``/v1`` API, the E2B-compatible one) are lists of routers; an app
is built from a :class:`ServiceContext` and any number of them. Routers reach the context through
``request.app.state.ctx`` and protect themselves with :func:`smartvm.service.auth.require_api_key`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from smartvm import __version__
from smartvm.service.body_limit import BodyLimit
from smartvm.service.context import ServiceContext
from smartvm.service.http_errors import install_error_handlers
from smartvm.service.routes import native_routers
from smartvm.service.routes.files import UPLOAD_PATH

DESCRIPTION = (
    "Sandboxes (microVMs restored from templates) over HTTP. Every route except `/health` and the page "
    "at `/test` needs an API key in the `X-API-Key` header (`smartvm keys create`). Errors are JSON: "
    '`{"code": "...", "message": "..."}`.'
)


def mount_routers(app: FastAPI, routers: Iterable[APIRouter]) -> None:
    for router in routers:
        app.include_router(router)


def create_app(
    ctx: ServiceContext, routers: Iterable[APIRouter] | None = None, upload_paths: Iterable[str] = ()
) -> FastAPI:
    """The app serving ``routers`` (default: the native face) over ``ctx``.

    Request bodies are limited to ``ctx.limits.max_json_bytes``, except on the paths matching
    the native upload route or a regex in ``upload_paths`` (``max_upload_bytes``).

    Its lifespan opens and closes ``ctx`` (both idempotent: ``smartvm serve`` opens it before it
    listens, so that /health is 200 from the first connection on).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ctx.open()
        try:
            yield
        finally:
            await ctx.close()

    app = FastAPI(title="smartvm", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.ctx = ctx
    install_error_handlers(app, ctx.metrics.count_error)
    mount_routers(app, native_routers() if routers is None else routers)
    app.add_middleware(
        BodyLimit,
        default=ctx.limits.max_json_bytes,
        by_path=[(re.compile(p), ctx.limits.max_upload_bytes) for p in (UPLOAD_PATH, *upload_paths)],
        on_error=ctx.metrics.count_error,
    )
    return app
