"""Request body limits as pure ASGI middleware: 413 before a large body is read, not after.

A declared ``Content-Length`` over the limit is answered at once, without calling the app; a body
without one (chunked) is counted as it is received and cut off with the same 413 once it passes the
limit. Routes that stream large bodies (file uploads) get their own limit by path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smartvm.errors import ErrorCode
from smartvm.service.http_errors import error_body


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes: send less (or split it)"


class BodyLimit:
    def __init__(
        self,
        app: ASGIApp,
        default: int,
        by_path: Sequence[tuple[re.Pattern[str], int]] = (),
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.default = default
        self.by_path = list(by_path)
        self.on_error = on_error  # counts the 413s answered here (the app's handlers count the rest)

    def limit_for(self, path: str) -> int:
        return next((limit for pattern, limit in self.by_path if pattern.search(path)), self.default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            if self.on_error is not None:
                self.on_error(ErrorCode.REQUEST_TOO_LARGE.value)
            response = JSONResponse(
                error_body(ErrorCode.REQUEST_TOO_LARGE, _too_large(limit)), status_code=413
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, _too_large(limit))  # FastAPI re-raises it from body reads
            return message

        await self.app(scope, counted, send)
