"""Guest files: upload and download (both streamed), list, mkdir, remove, rename.

``PUT .../files/content?path=P`` takes the raw body and streams it into the guest chunk by chunk as
it arrives (never whole in host memory, never in a host file); the agent writes a hidden part file
and renames it over the target at the end, so a body cut short (over the size limit, which the
body-limit middleware enforces as bytes arrive, or a client that went away) leaves the target as it
was. ``GET .../files/content?path=P`` streams the guest file out; its first chunk is read before the
response starts, so a missing file is a 404 JSON error rather than a cut-off body. A client that
leaves a download ends the guest read at once.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

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
    with service(request).metrics.stream("upload"):
        try:
            return FileOut.of(await sbx.files.write_stream(path, request.stream()))
        except ClientDisconnect:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                "the client went away before the upload ended: nothing was written, send it again",
            ) from None


@router.get(
    "/{sandbox_id}/files/content",
    summary="Download a file (streamed)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download_file(sbx: Sandbox, path: PathQuery, request: Request) -> StreamingResponse:
    metrics = service(request).metrics
    chunks = sbx.files.read_stream(path)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""

    async def body() -> AsyncIterator[bytes]:
        with metrics.stream("download"):
            try:
                if first:
                    yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:  # ends the guest read too
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
