"""Failures of the E2B REST routes as the E2B SDK reads them: ``{"code": <HTTP status>, "message": ...}``.

The native face answers ``{"code": "SANDBOX_NOT_FOUND", ...}`` through app-wide handlers; E2B's
clients want the status as an integer code and 400 (not 422) for a bad body. :class:`E2BRoute`
catches what its route (and the route's dependencies: the API key, the body) raises and answers
it in E2B's shape, so the two faces share one app, one status table and one set of metrics.
The SDK maps 401, 404, 409, 429 and 503 to its typed exceptions; the status comes from the
service's table (:func:`smartvm.service.http_errors.status_for`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.service.http_errors import status_for

log = logging.getLogger(__name__)
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def e2b_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in list(exc.errors())[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is not valid"


class E2BRoute(APIRoute):
    """A route whose failures are answered in E2B's error shape (and counted like all others)."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except SmartVMError as exc:
                status, code, message = status_for(exc), exc.code.value, exc.message
                if status >= 500:
                    log.warning("%s %s: %s", request.method, request.url.path, exc)
            except RequestValidationError as exc:
                status, code, message = 400, ErrorCode.VALIDATION_FAILED.value, _validation_message(exc)
            except HTTPException as exc:  # the body limit
                status, code = exc.status_code, ErrorCode.INVALID_ARGUMENT.value
                message = str(exc.detail)
                if status == 413:
                    code = ErrorCode.REQUEST_TOO_LARGE.value
            request.app.state.ctx.metrics.count_error(code)
            return e2b_error(status, message)

        return route
