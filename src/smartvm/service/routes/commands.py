"""Commands in a sandbox: one-shot exec (JSON), streaming exec (WebSocket), background processes.

The WebSocket ``/v1/sandboxes/{id}/exec/stream`` takes one :class:`ExecIn` as its first message and
answers with ``start``, ``stdout``/``stderr`` (text, decoded incrementally) and ``exit`` events, then
closes (1000). A failure is an ``error`` event with the JSON error body and a close code of
4000 + the HTTP status (4401 bad key, 4404 unknown sandbox, ...). When the client goes away the
command is cancelled, which kills its process group in the guest: nothing is left running.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.service.auth import checked_key, websocket_key, websocket_subprotocol
from smartvm.service.backend import SandboxHandle
from smartvm.service.context import ServiceContext
from smartvm.service.deps import check_sandbox_id, sandbox, service
from smartvm.service.http_errors import error_body, status_for
from smartvm.service.models import BackgroundOut, ExecIn, ExecOut, KilledOut, ProcessOut, StdinIn

router = APIRouter(prefix="/v1/sandboxes", tags=["commands"])
# The socket checks its key itself (browsers send it as a subprotocol), so it is not under the
# routers whose dependency reads the X-API-Key header.
ws_router = APIRouter(prefix="/v1/sandboxes", tags=["commands"])
Sandbox = Annotated[SandboxHandle, Depends(sandbox)]
SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGSTOP", "SIGCONT")


def _spawn_args(body: ExecIn) -> dict[str, Any]:
    args: dict[str, Any] = {"envs": body.envs, "cwd": body.cwd}
    if body.user is not None:
        args["user"] = body.user
    return args


def _stdin(body: ExecIn, ctx: ServiceContext) -> bytes | None:
    if body.stdin is None:
        return None
    data = body.stdin.encode()
    if len(data) > ctx.limits.max_exec_stdin_bytes:
        raise SmartVMError(
            ErrorCode.REQUEST_TOO_LARGE,
            f"stdin is larger than {ctx.limits.max_exec_stdin_bytes} bytes: upload a file and redirect it",
        )
    return data


@router.post(
    "/{sandbox_id}/exec",
    summary="Run a command and return its output (or, with background, its pid at once)",
)
async def exec_command(sbx: Sandbox, body: ExecIn, request: Request) -> ExecOut | BackgroundOut:
    ctx = service(request)
    stdin = _stdin(body, ctx)
    if body.background:
        handle = await sbx.commands.start(body.cmd, stdin=True, **_spawn_args(body))
        if stdin:
            try:
                await sbx.commands.send_stdin(handle.pid, stdin)
            except BaseException:  # the client never learns its pid: do not leave it running
                with contextlib.suppress(SmartVMError):
                    await sbx.commands.kill(handle.pid)
                raise
        return BackgroundOut(pid=handle.pid)
    with ctx.metrics.timed("exec"):
        result = await sbx.commands.run(body.cmd, timeout=body.timeout, stdin=stdin, **_spawn_args(body))
    return ExecOut.of(result)


@router.get("/{sandbox_id}/processes", summary="Background processes the guest knows")
async def list_processes(sbx: Sandbox) -> list[ProcessOut]:
    return [ProcessOut.of(p) for p in await sbx.commands.list()]


@router.delete("/{sandbox_id}/processes/{pid}", summary="Signal a background process (its process group)")
async def kill_process(
    sbx: Sandbox, pid: int, signal: Annotated[str, Query(pattern="^(" + "|".join(SIGNALS) + ")$")] = "SIGKILL"
) -> KilledOut:
    return KilledOut(pid=pid, signalled=await sbx.commands.kill(pid, signal))


@router.post("/{sandbox_id}/processes/{pid}/stdin", status_code=204, summary="Send to a process's stdin")
async def send_stdin(sbx: Sandbox, pid: int, body: StdinIn) -> Response:
    await sbx.commands.send_stdin(pid, body.data, eof=body.eof)
    return Response(status_code=204)


async def _send_error(ws: WebSocket, status: int, code: str, message: str) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already
        await ws.send_json({"type": "error", **error_body(code, message)})
        await ws.close(code=4000 + status)


async def _until_disconnect(ws: WebSocket) -> None:
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _stream(ws: WebSocket, sbx: SandboxHandle, body: ExecIn, ctx: ServiceContext) -> None:
    decoders = {
        name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in ("stdout", "stderr")
    }

    def sender(name: str) -> Any:
        async def send(chunk: bytes) -> None:
            if text := decoders[name].decode(chunk):
                await ws.send_json({"type": name, "data": text})

        return send

    commands, stdin = sbx.commands, _stdin(body, ctx)  # fail before "start" when they can
    await ws.send_json({"type": "start"})
    run = asyncio.create_task(
        commands.run(
            body.cmd,
            timeout=body.timeout,
            stdin=stdin,
            on_stdout=sender("stdout"),
            on_stderr=sender("stderr"),
            **_spawn_args(body),
        )
    )
    watch = asyncio.create_task(_until_disconnect(ws))
    try:
        await asyncio.wait({run, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (run, watch):
            if not task.done():
                task.cancel()  # a client that went away cancels the command in the guest
        await asyncio.gather(run, watch, return_exceptions=True)
    if run.cancelled():  # the client went away first: nobody is left to answer
        return
    result = run.result()
    for name, decoder in decoders.items():
        if tail := decoder.decode(b"", final=True):
            await ws.send_json({"type": name, "data": tail})
    await ws.send_json({"type": "exit", **ExecOut.of(result).model_dump(exclude={"stdout", "stderr"})})
    await ws.close(code=1000)


@ws_router.websocket("/{sandbox_id}/exec/stream")
async def exec_stream(ws: WebSocket, sandbox_id: str) -> None:
    ctx: ServiceContext = ws.app.state.ctx
    await ws.accept(subprotocol=websocket_subprotocol(ws))
    try:
        await checked_key(ctx, websocket_key(ws))
        sbx = await ctx.backend.get(check_sandbox_id(sandbox_id))
        body = ExecIn.model_validate_json(await ws.receive_text())
        if body.background:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, "background runs have no stream: use POST .../exec"
            )
        with ctx.metrics.stream("exec"):
            await _stream(ws, sbx, body, ctx)
    except SmartVMError as exc:
        ctx.metrics.count_error(exc.code.value)
        await _send_error(ws, status_for(exc), exc.code.value, exc.message)
    except ValidationError as exc:
        ctx.metrics.count_error(ErrorCode.VALIDATION_FAILED.value)
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "message"
        await _send_error(ws, 422, ErrorCode.VALIDATION_FAILED.value, f"{where}: {first['msg']}")
    except WebSocketDisconnect:
        return
