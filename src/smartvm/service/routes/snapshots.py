"""Snapshots (named, from a running or paused sandbox; new sandboxes are created from them by name)
and templates (list, build)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from smartvm.service.backend import SandboxHandle, TemplateBuild
from smartvm.service.deps import backend, sandbox, service
from smartvm.service.models import Name, SnapshotIn, SnapshotOut, TemplateIn, TemplateOut

router = APIRouter(prefix="/v1", tags=["snapshots and templates"])
Sandbox = Annotated[SandboxHandle, Depends(sandbox)]


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201, summary="Snapshot a sandbox by name")
async def create_snapshot(sbx: Sandbox, body: SnapshotIn, request: Request) -> SnapshotOut:
    with service(request).metrics.timed("snapshot"):
        snap = await sbx.snapshot(body.name)
    return SnapshotOut.of(snap)


@router.get("/snapshots", summary="List snapshots with their size on disk")
async def list_snapshots(request: Request) -> list[SnapshotOut]:
    return [SnapshotOut.of(s) for s in await backend(request).list_snapshots()]


@router.delete("/snapshots/{name}", status_code=204, summary="Delete a snapshot no sandbox depends on")
async def delete_snapshot(name: Name, request: Request) -> Response:
    await backend(request).delete_snapshot(name)
    return Response(status_code=204)


@router.get("/templates", summary="List templates")
async def list_templates(request: Request) -> list[TemplateOut]:
    return [TemplateOut.of(t) for t in await backend(request).list_templates()]


@router.post("/templates", status_code=201, summary="Build a template (boot once, snapshot when ready)")
async def build_template(body: TemplateIn, request: Request) -> TemplateOut:
    build = TemplateBuild(
        name=body.name,
        cpus=body.cpus,
        memory_mib=body.memory_mib,
        envs=body.envs,
        start_command=body.start_command,
        ready_command=body.ready_command,
    )
    return TemplateOut.of(await backend(request).build_template(build))
