"""``/v1/sandboxes``: create, list (by state and metadata), get, delete, pause, resume, timeout,
egress, fork, metrics and the event log of one sandbox."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.store import SandboxState
from smartvm.service.backend import SandboxHandle
from smartvm.service.deps import backend, sandbox, service
from smartvm.service.models import (
    CreateSandboxIn,
    EgressIn,
    ErrorOut,
    EventOut,
    ForkIn,
    ForkOut,
    MetricsOut,
    ResumeIn,
    SandboxOut,
    TimeoutIn,
)

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])
Sandbox = Annotated[SandboxHandle, Depends(sandbox)]


def _metadata_filter(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"metadata filter {pair!r}: write it as key=value (repeat for more)",
            )
        out[key] = value
    return out


@router.post("", status_code=201, summary="Create a sandbox from a template or snapshot")
async def create_sandbox(body: CreateSandboxIn, request: Request) -> SandboxOut:
    ctx = service(request)
    with ctx.metrics.timed("create"):
        sbx = await ctx.backend.create(
            body.template,
            timeout=body.timeout,
            metadata=body.metadata,
            envs=body.envs,
            auto_pause=body.auto_pause,
            cpus=body.cpus,
            memory_mib=body.memory_mib,
            internet=body.internet,
            egress=body.egress.policy() if body.egress is not None else None,
        )
    return SandboxOut.of(await sbx.info())


@router.get("", summary="List sandboxes (default: all but stopped)")
async def list_sandboxes(
    request: Request,
    state: Annotated[list[SandboxState] | None, Query(description="repeat for several states")] = None,
    metadata: Annotated[list[str] | None, Query(description="key=value; repeat for several")] = None,
) -> list[SandboxOut]:
    found = await backend(request).infos(states=state, metadata=_metadata_filter(metadata or []))
    return [SandboxOut.of(info) for info in found]


@router.get("/{sandbox_id}", summary="One sandbox")
async def get_sandbox(sbx: Sandbox) -> SandboxOut:
    return SandboxOut.of(await sbx.info())


@router.delete("/{sandbox_id}", status_code=204, summary="Kill a sandbox and free all it holds")
async def delete_sandbox(sbx: Sandbox, request: Request) -> Response:
    with service(request).metrics.timed("kill"):
        await sbx.kill()
    return Response(status_code=204)


@router.post("/{sandbox_id}/pause", summary="Pause to disk (memory and processes kept)")
async def pause_sandbox(sbx: Sandbox, request: Request) -> SandboxOut:
    with service(request).metrics.timed("pause"):
        await sbx.pause()
    return SandboxOut.of(await sbx.info())


@router.post("/{sandbox_id}/resume", summary="Resume a paused sandbox")
async def resume_sandbox(sbx: Sandbox, request: Request, body: ResumeIn | None = None) -> SandboxOut:
    with service(request).metrics.timed("resume"):
        await sbx.resume(timeout=body.timeout if body else None)
    return SandboxOut.of(await sbx.info())


@router.post("/{sandbox_id}/timeout", summary="End the sandbox this many seconds from now")
async def set_timeout(sbx: Sandbox, body: TimeoutIn) -> SandboxOut:
    await sbx.set_timeout(body.timeout)
    return SandboxOut.of(await sbx.info())


@router.get("/{sandbox_id}/metrics", summary="CPU, memory and disk use of one sandbox")
async def sandbox_metrics(sbx: Sandbox) -> MetricsOut:
    return MetricsOut.of(await sbx.metrics())


@router.get("/{sandbox_id}/events", summary="The sandbox's event log, oldest first")
async def sandbox_events(sbx: Sandbox, request: Request) -> list[EventOut]:
    return [EventOut.of(e) for e in await backend(request).events(sbx.id)]


@router.put("/{sandbox_id}/egress", summary="Replace what the sandbox may connect to")
async def set_egress(sbx: Sandbox, body: EgressIn) -> SandboxOut:
    await sbx.set_egress(body.policy())
    return SandboxOut.of(await sbx.info())


@router.post(
    "/{sandbox_id}/fork",
    status_code=201,
    summary="New sandboxes that continue from this one",
    response_model=list[ForkOut],
)
async def fork_sandbox(sbx: Sandbox, request: Request, body: ForkIn | None = None) -> JSONResponse:
    asked = body or ForkIn()
    with service(request).metrics.timed("fork"):
        results = await sbx.fork(asked.count, timeout=asked.timeout)
    out: list[dict[str, object]] = []  # each item has either its sandbox or its error
    for result in results:
        if isinstance(result, SmartVMError):
            out.append({"error": ErrorOut(code=result.code.value, message=result.message).model_dump()})
        else:
            out.append({"sandbox": SandboxOut.of(await result.info()).model_dump(mode="json")})
    return JSONResponse(out, status_code=201)
