"""The routers of the native face: open ones (health, the page) and the key-protected ``/v1`` API."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from smartvm.service.auth import require_api_key


def native_routers() -> list[APIRouter]:
    """Every router of the native face; the ``/v1`` ones need an API key."""
    from smartvm.service.routes import commands, files, sandboxes, snapshots, system

    v1 = APIRouter(dependencies=[Depends(require_api_key)], responses=_errors())
    for module in (sandboxes, commands, files, snapshots):
        v1.include_router(module.router)
    return [system.public, system.protected, v1, commands.ws_router]


def _errors() -> dict[int | str, dict[str, object]]:
    from smartvm.service.models import ERROR_RESPONSES

    return dict(ERROR_RESPONSES)
