"""The E2B REST routes the E2B SDK (2.63.0) uses for sandboxes, as thin translations to the backend.

Status codes are the ones the SDK's generated client parses for each route (an unexpected one
makes it fail with "Body of the request is None"): create 201, connect 200 (was running) or 201
(resumed), kill/pause/timeout 204, lists 200 with the ``x-next-token`` header while more follow.
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.store import SandboxState
from smartvm.service.auth import require_api_key
from smartvm.service.backend import SandboxHandle, SandboxInfoLike
from smartvm.service.e2b.app import ENVD_VERSION
from smartvm.service.e2b.rest.egress import e2b_rules, egress_policy
from smartvm.service.e2b.rest.errors import E2BRoute
from smartvm.service.e2b.rest.face import E2BFace
from smartvm.service.e2b.rest.listing import MAX_LIMIT, NEXT_TOKEN_HEADER, metadata_filter, page, state_filter
from smartvm.service.e2b.rest.models import (
    MIB,
    ConnectSandbox,
    CreatedSandbox,
    ForkError,
    ForkRequest,
    ForkResult,
    Lifecycle,
    ListedSandbox,
    NetworkRules,
    NewSandbox,
    PauseRequest,
    SandboxDetail,
    SandboxMetric,
    SnapshotInfo,
    SnapshotRequest,
    TemplateAlias,
    TimeoutRequest,
    e2b_state,
    rfc3339,
)
from smartvm.service.http_errors import status_for

S = SandboxState
router = APIRouter(route_class=E2BRoute, dependencies=[Depends(require_api_key)], tags=["E2B-compatible"])


async def face(request: Request) -> E2BFace:
    """The routes' E2BFace (async: FastAPI would run a plain function in its thread pool, a thread
    hop on every request)."""
    e2b: E2BFace = request.app.state.e2b
    return e2b


Face = Annotated[E2BFace, Depends(face)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="items per page")]
NextToken = Annotated[str | None, Query(alias="nextToken", description="x-next-token of the last page")]


def _no_memoryless(memory: bool | None, what: str) -> None:
    if memory is False:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"{what} without memory (filesystem only) is not supported: smartvm keeps memory; leave it out",
        )


def _refuse(unsupported: list[str]) -> None:
    if unsupported:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"not supported by smartvm: {'; '.join(unsupported)}: leave them out"
        )


async def created(
    e2b: E2BFace, sbx: SandboxHandle, template: str, *, new_token: bool = False
) -> CreatedSandbox:
    return CreatedSandbox(
        template_id=template,
        sandbox_id=sbx.id,
        alias=template,
        envd_version=ENVD_VERSION,
        envd_access_token=await e2b.token(sbx.id, new=new_token),
    )


@router.post("/v2/sandboxes", status_code=201, summary="Create a sandbox (E2B)")
async def create_sandbox(body: NewSandbox, e2b: Face) -> CreatedSandbox:
    _refuse(body.unsupported())
    rules = body.network or NetworkRules()
    egress = egress_policy(rules.allow_out, rules.deny_out, body.allow_internet_access)
    ctx = e2b.ctx
    with ctx.metrics.timed("create"):
        sbx = await ctx.backend.create(
            body.template_id,
            timeout=body.timeout,
            metadata=body.metadata,
            envs=body.env_vars,
            auto_pause=body.auto_pause,
            egress=egress,
        )
    try:
        return await created(e2b, sbx, body.template_id, new_token=True)
    except BaseException:
        await sbx.kill()  # a sandbox nobody can reach must not keep running
        raise


def listed(info: SandboxInfoLike, sizes: dict[str, int]) -> ListedSandbox | None:
    state = e2b_state(info.state)
    if state is None:
        return None
    return ListedSandbox.of(info, state, ENVD_VERSION, sizes.get(info.template, 0))


@router.get("/v2/sandboxes", summary="List running and paused sandboxes (E2B)")
async def list_sandboxes(
    e2b: Face,
    response: Response,
    metadata: Annotated[str | None, Query(description="k=v pairs joined by '&', URL-encoded")] = None,
    state: Annotated[list[str] | None, Query(description="running, paused (comma-separated)")] = None,
    order: Literal["asc", "desc"] = "desc",
    started_after: Annotated[datetime | None, Query(alias="startedAfter")] = None,
    template: str | None = None,
    next_token: NextToken = None,
    limit: Limit = MAX_LIMIT,
) -> list[ListedSandbox]:
    infos = await e2b.ctx.backend.infos(states=state_filter(state), metadata=metadata_filter(metadata))
    if template is not None:
        infos = [i for i in infos if i.template == template]
    if started_after is not None:
        infos = [i for i in infos if i.created_at >= started_after.timestamp()]
    found = page(
        infos, lambda i: (i.created_at, i.id), limit=limit, next_token=next_token, descending=order == "desc"
    )
    if found.next_token:
        response.headers[NEXT_TOKEN_HEADER] = found.next_token
    sizes = await e2b.disk_sizes_mib()
    return [item for item in (listed(i, sizes) for i in found.items) if item is not None]


@router.get("/sandboxes/{sandbox_id}", summary="One sandbox (E2B)")
async def get_sandbox(sandbox_id: str, e2b: Face) -> SandboxDetail:
    info = await (await e2b.sandbox(sandbox_id)).info()
    state = e2b_state(info.state)
    if state is None:
        raise SmartVMError(ErrorCode.SANDBOX_NOT_FOUND, f"sandbox {sandbox_id} is {info.state.value}")
    listed = ListedSandbox.of(info, state, ENVD_VERSION, (await e2b.disk_sizes_mib()).get(info.template, 0))
    return SandboxDetail(
        **listed.model_dump(),
        envd_access_token=e2b.tokens.get(sandbox_id),
        lifecycle=Lifecycle(on_timeout="pause" if info.auto_pause else "kill"),
        network=e2b_rules(info.egress),
    )


@router.delete("/sandboxes/{sandbox_id}", status_code=204, summary="Kill a sandbox (E2B)")
async def kill_sandbox(sandbox_id: str, e2b: Face) -> Response:
    sbx = await e2b.sandbox(sandbox_id, failed_ok=True)
    with e2b.ctx.metrics.timed("kill"):
        await sbx.kill()
    await e2b.forget(sandbox_id, gone=True)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204, summary="End the sandbox N s from now (E2B)")
async def set_timeout(sandbox_id: str, body: TimeoutRequest, e2b: Face) -> Response:
    await (await e2b.sandbox(sandbox_id)).set_timeout(body.timeout)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201, summary="Fork a running sandbox (E2B)")
async def fork_sandbox(sandbox_id: str, e2b: Face, body: ForkRequest | None = None) -> JSONResponse:
    request = body or ForkRequest()
    sbx = await e2b.sandbox(sandbox_id)
    with e2b.ctx.metrics.timed("fork"):
        results = await sbx.fork(request.count, timeout=request.timeout or None)
    out = []
    for result in results:
        if isinstance(result, SmartVMError):
            out.append(ForkResult(error=ForkError(code=status_for(result), message=result.message)))
        else:
            out.append(ForkResult(sandbox=await created(e2b, result, result.template, new_token=True)))
    # null members left out: the SDK reads a present ``error: null`` as a failed fork
    return JSONResponse([r.model_dump(mode="json", exclude_none=True) for r in out], status_code=201)


@router.put("/sandboxes/{sandbox_id}/network", status_code=204, summary="Replace egress rules (E2B)")
async def update_network(sandbox_id: str, body: NetworkRules, e2b: Face) -> Response:
    _refuse(body.unsupported())
    egress = egress_policy(body.allow_out, body.deny_out, body.allow_internet_access)
    await (await e2b.sandbox(sandbox_id)).set_egress(egress)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204, summary="Pause a sandbox (E2B; 409 if paused)")
async def pause_sandbox(sandbox_id: str, e2b: Face, body: PauseRequest | None = None) -> Response:
    _no_memoryless(body.memory if body else None, "a pause")
    sbx = await e2b.sandbox(sandbox_id)
    with e2b.ctx.metrics.timed("pause"):
        await sbx.pause()
    await e2b.forget(sandbox_id, gone=False)
    return Response(status_code=204)


# connect answers 200 (it ran) or 201 (resumed), here and on its v1 path (legacy.py)
CONNECT_ANSWERS: dict[str, Any] = {
    "response_model": CreatedSandbox,
    "responses": {201: {"model": CreatedSandbox, "description": "resumed"}},
}


@router.post(
    "/v2/sandboxes/{sandbox_id}/connect",
    **CONNECT_ANSWERS,
    summary="Connect: resume a paused sandbox (201), or extend a running one's end (200) (E2B)",
)
async def connect_sandbox(sandbox_id: str, body: ConnectSandbox, e2b: Face) -> JSONResponse:
    _no_memoryless(body.memory, "a resume")
    sbx = await e2b.sandbox(sandbox_id)
    info = await sbx.info()
    status = 200
    if info.state is S.PAUSED:
        try:
            with e2b.ctx.metrics.timed("resume"):
                await sbx.resume(timeout=body.timeout)
            status = 201
        except SmartVMError as exc:  # a concurrent connect resumed it first
            if exc.code is not ErrorCode.SANDBOX_NOT_PAUSED or _state(sbx) is not S.RUNNING:
                raise
    elif info.state is not S.RUNNING:
        raise SmartVMError(
            ErrorCode.SANDBOX_NOT_RUNNING,
            f"sandbox {sandbox_id} is {info.state.value}: try again in a moment",
        )
    elif body.timeout is not None:
        await extend_end(sbx, info, body.timeout)
    answer = await created(e2b, sbx, info.template)
    return JSONResponse(answer.model_dump(mode="json", by_alias=True), status_code=status)


async def extend_end(sbx: SandboxHandle, info: SandboxInfoLike, seconds: float) -> None:
    """The sandbox ends ``seconds`` from now unless it already ends later (connect and refresh only
    ever move the end later)."""
    if seconds and time.time() + seconds > info.end_at:
        await sbx.set_timeout(seconds)


def _state(sbx: SandboxHandle) -> SandboxState:
    """The state now (a call, so that type checkers do not keep an earlier comparison's answer)."""
    return sbx.state


@router.get("/sandboxes/{sandbox_id}/metrics", summary="CPU, memory and disk use now (E2B)")
async def sandbox_metrics(
    sandbox_id: str,
    e2b: Face,
    start: Annotated[int | None, Query(ge=0)] = None,
    end: Annotated[int | None, Query(ge=0)] = None,
) -> list[SandboxMetric]:
    """One sample, taken now (smartvm keeps no history); none while the sandbox is not running or
    when now is outside ``start``..``end``."""
    sbx = await e2b.sandbox(sandbox_id)
    now = time.time()
    if (
        sbx.state is not S.RUNNING
        or (start is not None and now < start)
        or (end is not None and now > end + 1)
    ):
        return []
    info = await sbx.info()
    m = await sbx.metrics()
    total = m.memory_mib * MIB
    return [
        SandboxMetric(
            timestamp=rfc3339(m.timestamp),
            timestamp_unix=int(m.timestamp),
            cpu_count=m.cpu_count,
            cpu_used_pct=e2b.cpu_percent(sandbox_id, m, info.created_at),
            mem_used=min(m.memory_rss_bytes, total),
            mem_total=total,
            mem_cache=0,
            disk_used=m.disk_bytes,
            disk_total=(await e2b.disk_sizes_mib()).get(info.template, 0) * MIB,
        )
    ]


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201, summary="Snapshot a sandbox (E2B)")
async def create_snapshot(sandbox_id: str, body: SnapshotRequest, e2b: Face) -> SnapshotInfo:
    _no_memoryless(body.memory, "a snapshot")
    sbx = await e2b.sandbox(sandbox_id)
    name = body.name or f"{sandbox_id}-{secrets.token_hex(4)}"
    with e2b.ctx.metrics.timed("snapshot"):
        snap = await sbx.snapshot(name)
    return SnapshotInfo.of(snap)


@router.get("/snapshots", summary="List snapshots (E2B)")
async def list_snapshots(
    e2b: Face,
    response: Response,
    sandbox_id: Annotated[str | None, Query(alias="sandboxID")] = None,
    name: str | None = None,
    next_token: NextToken = None,
    limit: Limit = MAX_LIMIT,
) -> list[SnapshotInfo]:
    snaps = [
        s
        for s in await e2b.ctx.backend.list_snapshots()
        if (sandbox_id is None or s.source_sandbox == sandbox_id) and (name is None or s.name == name)
    ]
    found = page(snaps, lambda s: (s.created_at, s.name), limit=limit, next_token=next_token)
    if found.next_token:
        response.headers[NEXT_TOKEN_HEADER] = found.next_token
    return [SnapshotInfo.of(s) for s in found.items]


@router.delete("/templates/{template_id}", status_code=204, summary="Delete a snapshot (E2B)")
async def delete_snapshot(template_id: str, e2b: Face) -> Response:
    await e2b.ctx.backend.delete_snapshot(template_id)
    return Response(status_code=204)


@router.get("/templates/aliases/{alias}", summary="Whether a template of this name exists (E2B)")
async def template_alias(alias: str, e2b: Face) -> TemplateAlias:
    names = {t.name for t in await e2b.ctx.backend.list_templates()} | {"base"}  # base: built on first use
    if alias not in names:
        raise SmartVMError(
            ErrorCode.TEMPLATE_NOT_FOUND, f"no template {alias!r}: list them with GET /v1/templates"
        )
    return TemplateAlias(template_id=alias)
