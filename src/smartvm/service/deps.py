"""Route dependencies: the service context, and a sandbox looked up by an id of the right shape."""

from __future__ import annotations

import re

from fastapi import Request

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.service.backend import SandboxBackend, SandboxHandle
from smartvm.service.context import ServiceContext
from smartvm.service.models import SANDBOX_ID_PATTERN

_SANDBOX_ID = re.compile(SANDBOX_ID_PATTERN)


def service(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


def backend(request: Request) -> SandboxBackend:
    return service(request).backend


def check_sandbox_id(sandbox_id: str) -> str:
    if not _SANDBOX_ID.match(sandbox_id):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"sandbox id {sandbox_id[:40]!r} has the wrong shape: ids look like sb-1a2b3c4d",
        )
    return sandbox_id


async def sandbox(request: Request, sandbox_id: str) -> SandboxHandle:
    """The sandbox of the route's ``{sandbox_id}``: 400 for a malformed id, 404 for an unknown one."""
    return await backend(request).get(check_sandbox_id(sandbox_id))
