"""smartvm errors as envd reports them: Connect codes for the RPCs, HTTP statuses for /files.

The SDK turns these into its exception types (NOT_FOUND/404 into ``NotFoundException``, a 502 or
UNAVAILABLE whose message says "was not found" into ``SandboxNotRunningException``...), so the mapping
decides what the user's ``except`` clauses see.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from starlette.responses import Response

from smartvm.agent import AgentOpError
from smartvm.errors import ErrorCode, SmartVMError

_BY_ERRNO = {
    "ENOENT": Code.NOT_FOUND,
    "EEXIST": Code.ALREADY_EXISTS,
    "ENOTDIR": Code.INVALID_ARGUMENT,
    "EISDIR": Code.INVALID_ARGUMENT,
    "ENOTEMPTY": Code.FAILED_PRECONDITION,
    "EACCES": Code.PERMISSION_DENIED,
    "EPERM": Code.PERMISSION_DENIED,
    "ENOSPC": Code.RESOURCE_EXHAUSTED,
    "EDQUOT": Code.RESOURCE_EXHAUSTED,
    "ELOOP": Code.FAILED_PRECONDITION,
}
_BY_CODE = {
    ErrorCode.INVALID_ARGUMENT: Code.INVALID_ARGUMENT,
    ErrorCode.AGENT_UNAVAILABLE: Code.UNAVAILABLE,
    ErrorCode.VM_EXITED: Code.UNAVAILABLE,
    ErrorCode.INVALID_STATE: Code.UNAVAILABLE,
    ErrorCode.AGENT_TIMEOUT: Code.DEADLINE_EXCEEDED,
    ErrorCode.EXEC_TIMEOUT: Code.DEADLINE_EXCEEDED,
    ErrorCode.GUEST_OUTPUT_TOO_LARGE: Code.RESOURCE_EXHAUSTED,
    ErrorCode.UNSUPPORTED_BY_ENGINE: Code.UNIMPLEMENTED,
    ErrorCode.SANDBOX_NOT_FOUND: Code.UNAVAILABLE,
    ErrorCode.SANDBOX_NOT_RUNNING: Code.UNAVAILABLE,
    ErrorCode.VM_NOT_FOUND: Code.UNAVAILABLE,
}
_STATUS = {
    Code.NOT_FOUND: HTTPStatus.NOT_FOUND,
    Code.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    Code.ALREADY_EXISTS: HTTPStatus.CONFLICT,
    Code.FAILED_PRECONDITION: HTTPStatus.BAD_REQUEST,
    Code.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    Code.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    Code.RESOURCE_EXHAUSTED: HTTPStatus.INSUFFICIENT_STORAGE,
    Code.UNAVAILABLE: HTTPStatus.BAD_GATEWAY,
    Code.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
    Code.UNIMPLEMENTED: HTTPStatus.NOT_IMPLEMENTED,
}


def connect_code(exc: SmartVMError) -> Code:
    if isinstance(exc, AgentOpError):
        if exc.errno in _BY_ERRNO:
            return _BY_ERRNO[exc.errno]
        if exc.agent_code in ("not_found", "no_such_process"):
            return Code.NOT_FOUND
    return _BY_CODE.get(exc.code, Code.INTERNAL)


def to_connect(exc: SmartVMError) -> ConnectError:
    """The ConnectError for a smartvm failure (the message keeps smartvm's advice)."""
    return ConnectError(connect_code(exc), exc.message)


def not_found_message(sandbox_id: str) -> str:
    """What the E2B proxy says for a sandbox that does not exist (the SDK matches "was not found")."""
    return f"The sandbox {sandbox_id} was not found: it was killed, timed out, or never existed"


def http_error(status: int, message: str) -> Response:
    """An envd JSON error body ``{"code": <status>, "message": ...}``."""
    body = json.dumps({"code": status, "message": message})
    return Response(body, status_code=status, media_type="application/json")


def http_error_for(exc: SmartVMError) -> Response:
    return http_error(_STATUS.get(connect_code(exc), HTTPStatus.INTERNAL_SERVER_ERROR), exc.message)


def connect_error_response(code: Code, message: str) -> Response:
    """A Connect unary error (JSON body with a string code) for requests refused before any handler."""
    status = _STATUS.get(code, HTTPStatus.INTERNAL_SERVER_ERROR)
    body = json.dumps({"code": code.value, "message": message})
    return Response(body, status_code=status, media_type="application/json")
