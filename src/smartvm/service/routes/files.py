"""Guest files: upload and download (both streamed), list, mkdir, remove, rename.

``PUT .../files/content?path=P`` takes the raw body. It is spooled, chunk by chunk, into a private
host file (so a large upload never sits whole in host memory and its size limit is checked before
the guest sees a byte) and then streamed into the guest by the agent, which replaces the target
atomically. ``GET .../files/content?path=P`` streams the guest file out; its first chunk is read
before the response starts, so a missing file is a 404 JSON error rather than a cut-off body.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.service.backend import SandboxHandle
from smartvm.service.deps import sandbox, service
from smartvm.service.models import FileOut, GuestPath, PathIn, RenameIn

router = APIRouter(prefix="/v1/sandboxes", tags=["files"])
Sandbox = Annotated[SandboxHandle, Depends(sandbox)]
PathQuery = Annotated[GuestPath, Query(description="a guest path; relative paths are under /home/user")]
UPLOAD_PATH = r"^/v1/sandboxes/[^/]+/files/content$"


@router.put("/{sandbox_id}/files/content", status_code=201, summary="Upload a file (raw body, streamed)")
async def upload_file(sbx: Sandbox, path: PathQuery, request: Request) -> FileOut:
    ctx = service(request)
    limit = ctx.limits.max_upload_bytes
    fd, spool = tempfile.mkstemp(dir=ctx.upload_dir, prefix="upload-")
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise SmartVMError(
                        ErrorCode.REQUEST_TOO_LARGE,
                        f"the upload is larger than {limit} bytes: send a smaller file",
                    )
                out.write(chunk)
        return FileOut.of(await sbx.files.upload(spool, path))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spool)


@router.get(
    "/{sandbox_id}/files/content",
    summary="Download a file (streamed)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download_file(sbx: Sandbox, path: PathQuery) -> StreamingResponse:
    chunks = sbx.files.read_stream(path)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""

    async def body() -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:  # a client that left ends the guest read too
                await aclose()

    name = os.path.basename(path.rstrip("/")) or "file"
    disposition = f"attachment; filename*=UTF-8''{_quote(name)}"
    return StreamingResponse(
        body(), media_type="application/octet-stream", headers={"Content-Disposition": disposition}
    )


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


@router.get("/{sandbox_id}/files", summary="List a directory")
async def list_files(sbx: Sandbox, path: PathQuery = "/home/user") -> list[FileOut]:
    return [FileOut.of(f) for f in await sbx.files.list(path)]


@router.post("/{sandbox_id}/files/mkdir", status_code=201, summary="Make a directory (and its parents)")
async def make_dir(sbx: Sandbox, body: PathIn) -> FileOut:
    return FileOut.of(await sbx.files.make_dir(body.path))


@router.delete("/{sandbox_id}/files", status_code=204, summary="Remove a file or a directory tree")
async def remove_file(sbx: Sandbox, path: PathQuery) -> Response:
    await sbx.files.remove(path)
    return Response(status_code=204)


@router.post("/{sandbox_id}/files/rename", summary="Rename (move) a file or directory")
async def rename_file(sbx: Sandbox, body: RenameIn) -> FileOut:
    return FileOut.of(await sbx.files.rename(body.src, body.dst))
