"""One mapping from failures to HTTP answers: ``{"code": ..., "message": ...}`` with an honest status.

Every route raises :class:`SmartVMError`; the handlers installed by :func:`install_error_handlers`
turn it (and FastAPI's own validation and routing errors) into that JSON body. Codes are looked up by
their string value so that codes added later by other layers only need a line here. A failure that is
not a SmartVMError is a bug: the server logs its traceback, the client gets INTERNAL_ERROR and no
detail, so nothing of the host leaks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from smartvm.errors import ErrorCode, SmartVMError

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

_BY_STATUS: dict[int, tuple[str, ...]] = {
    400: ("INVALID_ARGUMENT", "INVALID_CONFIG", "UNSAFE_PATH", "GUEST_FILE_ERROR"),
    401: ("UNAUTHORIZED",),
    404: (
        "SANDBOX_NOT_FOUND",
        "TEMPLATE_NOT_FOUND",
        "SNAPSHOT_NOT_FOUND",
        "API_KEY_NOT_FOUND",
        "VM_NOT_FOUND",
        "ROUTE_NOT_FOUND",
    ),
    409: (
        "INVALID_STATE",
        "INVALID_SANDBOX_TRANSITION",
        "SANDBOX_NOT_RUNNING",
        "SANDBOX_ALREADY_PAUSED",
        "SANDBOX_NOT_PAUSED",
        "SNAPSHOT_IN_USE",
        "SNAPSHOT_EXISTS",
        "DUPLICATE_VM_ID",
    ),
    413: ("REQUEST_TOO_LARGE", "GUEST_OUTPUT_TOO_LARGE"),
    422: ("VALIDATION_FAILED",),
    429: ("SANDBOX_LIMIT_REACHED",),
    503: ("HOST_CAPACITY", "ADDRESS_EXHAUSTED", "SERVICE_UNAVAILABLE", "DATA_DIR_IN_USE"),
    504: ("EXEC_TIMEOUT", "AGENT_TIMEOUT"),
}
STATUS_OF_CODE: dict[str, int] = {code: status for status, codes in _BY_STATUS.items() for code in codes}
# The guest agent's own error strings that say "no such thing" (AgentOpError.agent_code).
_AGENT_NOT_FOUND = frozenset({"not_found", "no_such_process"})


def status_for(exc: SmartVMError) -> int:
    """The HTTP status of ``exc``: by its code, 404 for the agent's not-found errors, else 500."""
    if getattr(exc, "agent_code", None) in _AGENT_NOT_FOUND:
        return 404
    return STATUS_OF_CODE.get(exc.code.value, 500)


def error_body(code: ErrorCode | str, message: str) -> dict[str, str]:
    return {"code": str(code), "message": message}


def _validation_message(errors: list[Any]) -> tuple[ErrorCode, str, int]:
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return (
            ErrorCode.INVALID_ARGUMENT,
            f"the request body is not valid JSON ({detail}): send a JSON object",
            400,
        )
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "request"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return ErrorCode.VALIDATION_FAILED, "; ".join(parts) + more, 422


def install_error_handlers(app: FastAPI, on_error: Callable[[str], None] | None = None) -> None:
    """Answer every failure of ``app`` with the JSON error body; ``on_error(code)`` counts them."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def answer(
        status: int, code: ErrorCode | str, message: str, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        if on_error is not None:
            on_error(str(code))
        return JSONResponse(error_body(code, message), status_code=status, headers=headers)

    async def smartvm_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SmartVMError)
        status = status_for(exc)
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        headers = {"WWW-Authenticate": "ApiKey"} if status == 401 else None
        return answer(status, exc.code, exc.message, headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        code, message, status = _validation_message(list(exc.errors()))
        return answer(status, code, message)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            code, message = ErrorCode.ROUTE_NOT_FOUND, f"no route {request.url.path}: see /docs for the API"
        elif exc.status_code == 405:
            code = ErrorCode.ROUTE_NOT_FOUND
            message = f"{request.method} is not a method of {request.url.path}: see /docs for the API"
        elif exc.status_code == 413:
            code, message = ErrorCode.REQUEST_TOO_LARGE, str(exc.detail)
        elif exc.status_code == 401:
            code, message = ErrorCode.UNAUTHORIZED, str(exc.detail)
        else:
            code, message = ErrorCode.INVALID_ARGUMENT, str(exc.detail)
        return answer(exc.status_code, code, message, dict(exc.headers or {}))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, and the server logs the traceback.
        return answer(500, ErrorCode.INTERNAL_ERROR, "internal error: the service log has the details")

    app.add_exception_handler(SmartVMError, smartvm_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
