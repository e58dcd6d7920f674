"""API key checks for routes and WebSockets, reusable by every face of the service.

HTTP header names are case-insensitive, so ``X-API-Key`` (the native API) and ``X-API-KEY`` (E2B's
clients) are one header and :func:`require_api_key` serves both. Browsers cannot set headers on a
WebSocket, so a socket may instead offer the subprotocol ``key.<API key>`` next to ``smartvm``.
A failed check says only that the key is missing or not valid: nothing about what it protects.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.service.keys import ApiKey

if TYPE_CHECKING:
    from fastapi import WebSocket

    from smartvm.service.context import ServiceContext

API_KEY_HEADER = "X-API-Key"
WS_PROTOCOL = "smartvm"
WS_KEY_PROTOCOL_PREFIX = "key."
api_key_header = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="A key from `smartvm keys create`"
)


def check_key(ctx: ServiceContext, key: str | None) -> ApiKey:
    """The active key record for ``key``, or UNAUTHORIZED."""
    if not key:
        raise SmartVMError(ErrorCode.UNAUTHORIZED, f"missing API key: send it in the {API_KEY_HEADER} header")
    found = ctx.key_store.verify(key)
    if found is None:
        raise SmartVMError(ErrorCode.UNAUTHORIZED, "the API key is not valid (unknown or revoked)")
    return found


async def checked_key(ctx: ServiceContext, key: str | None) -> ApiKey:
    """:func:`check_key` from the event loop: inline, as it only reads SQLite (microseconds; a thread
    hop costs far more on a busy service), in a thread when it also records the key's last use."""
    if ctx.key_store.writes_on_verify(key):
        return await asyncio.to_thread(check_key, ctx, key)
    return check_key(ctx, key)


async def require_api_key(request: Request, key: str | None = Security(api_key_header)) -> ApiKey:
    """Route dependency."""
    ctx: ServiceContext = request.app.state.ctx
    return await checked_key(ctx, key)


def websocket_key(ws: WebSocket) -> str | None:
    """The key a WebSocket client sent: the header, else a ``key.<key>`` subprotocol."""
    if key := ws.headers.get(API_KEY_HEADER):
        return key
    offered = ws.scope.get("subprotocols") or []
    return next(
        (p[len(WS_KEY_PROTOCOL_PREFIX) :] for p in offered if p.startswith(WS_KEY_PROTOCOL_PREFIX)), None
    )


def websocket_subprotocol(ws: WebSocket) -> str | None:
    """The subprotocol to accept with: ``smartvm`` when offered (a browser needs one chosen)."""
    return WS_PROTOCOL if WS_PROTOCOL in (ws.scope.get("subprotocols") or []) else None
