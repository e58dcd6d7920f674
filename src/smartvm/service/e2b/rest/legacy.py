"""E2B routes that SDK 2.63.0 no longer calls but older SDKs (and scripts written against the v1 API)
do: v1 create, list and connect, the deprecated resume, refreshes, and the metrics of many sandboxes.
Each is a thin layer over the route it was replaced by (``routes.py``).

Mounted before ``routes.router``: ``GET /sandboxes/metrics`` must win over ``GET /sandboxes/{id}``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import JSONResponse
from pydantic import Field

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.store import SandboxState
from smartvm.service.auth import require_api_key
from smartvm.service.e2b.rest import routes
from smartvm.service.e2b.rest.errors import E2BRoute
from smartvm.service.e2b.rest.listing import metadata_filter
from smartvm.service.e2b.rest.models import (
    ConnectSandbox,
    CreatedSandbox,
    ListedSandbox,
    NewSandbox,
    SandboxMetric,
    _In,
    _Out,
)

router = APIRouter(route_class=E2BRoute, dependencies=[Depends(require_api_key)], tags=["E2B-compatible"])
Face = routes.Face
MAX_REFRESH_S = 3600


class ResumeRequest(_In):
    timeout: int = Field(default=15, ge=0, description="seconds the resumed sandbox lives")
    auto_pause: bool | None = Field(default=None, alias="autoPause")


class RefreshRequest(_In):
    duration: int = Field(default=0, ge=0, le=MAX_REFRESH_S, description="seconds to keep it alive")


class SandboxesMetrics(_Out):
    sandboxes: dict[str, SandboxMetric]


@router.post("/sandboxes", status_code=201, summary="Create a sandbox (E2B v1)")
async def create_sandbox_v1(body: NewSandbox, e2b: Face) -> CreatedSandbox:
    return await routes.create_sandbox(body, e2b)


@router.get("/sandboxes", summary="List running sandboxes (E2B v1)")
async def list_sandboxes_v1(
    e2b: Face,
    metadata: Annotated[str | None, Query(description="k=v pairs joined by '&', URL-encoded")] = None,
) -> list[ListedSandbox]:
    infos = await e2b.ctx.backend.infos(
        states=[SandboxState.STARTING, SandboxState.RUNNING, SandboxState.RESUMING],
        metadata=metadata_filter(metadata),
    )
    sizes = await e2b.disk_sizes_mib()
    listed = (routes.listed(info, sizes) for info in sorted(infos, key=lambda i: i.created_at))
    return [item for item in listed if item is not None]


@router.get("/sandboxes/metrics", summary="The metrics of several sandboxes, now (E2B)")
async def sandboxes_metrics(
    e2b: Face,
    sandbox_ids: Annotated[list[str], Query(description="comma-separated or repeated ids")],
) -> SandboxesMetrics:
    """The newest sample of each running sandbox among ``sandbox_ids``; unknown ones are left out."""
    ids = list(dict.fromkeys(i.strip() for v in sandbox_ids for i in v.split(",") if i.strip()))
    out: dict[str, SandboxMetric] = {}
    for sid in ids:
        try:
            samples = await routes.sandbox_metrics(sid, e2b)
        except SmartVMError as exc:
            if exc.code in (ErrorCode.SANDBOX_NOT_FOUND, ErrorCode.INVALID_ARGUMENT):
                continue
            raise
        if samples:
            out[sid] = samples[-1]
    return SandboxesMetrics(sandboxes=out)


@router.post(
    "/sandboxes/{sandbox_id}/connect",
    **routes.CONNECT_ANSWERS,
    summary="Connect (E2B v1): resume a paused sandbox (201), or extend a running one's end (200)",
)
async def connect_sandbox_v1(sandbox_id: str, body: ConnectSandbox, e2b: Face) -> JSONResponse:
    return await routes.connect_sandbox(sandbox_id, body, e2b)


@router.post("/sandboxes/{sandbox_id}/resume", status_code=201, summary="Resume a paused sandbox (E2B, old)")
async def resume_sandbox(sandbox_id: str, e2b: Face, body: ResumeRequest | None = None) -> CreatedSandbox:
    """409 when it runs (the old SDKs then connect instead)."""
    sbx = await e2b.sandbox(sandbox_id)
    with e2b.ctx.metrics.timed("resume"):
        await sbx.resume(timeout=(body or ResumeRequest()).timeout or None)
    return await routes.created(e2b, sbx, sbx.template)


@router.post(
    "/sandboxes/{sandbox_id}/refreshes", status_code=204, summary="Keep a sandbox alive longer (E2B)"
)
async def refresh_sandbox(sandbox_id: str, e2b: Face, body: RefreshRequest | None = None) -> Response:
    """The sandbox lives at least ``duration`` seconds more; an end further away stays."""
    sbx = await e2b.sandbox(sandbox_id)
    await routes.extend_end(sbx, await sbx.info(), (body or RefreshRequest()).duration)
    return Response(status_code=204)
