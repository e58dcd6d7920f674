"""envd's plain HTTP face: ``GET /health`` and ``GET``/``POST /files`` (download and upload).

Both directions stream: a download goes out chunk by chunk as the guest sends it, an upload goes to
the guest as the client sends it (octet-stream, gzip-encoded or not, and multipart with any number of
files), so a large file never sits whole in host memory. Writing as a user first creates the file
owned by that user (``file_prepare``); the atomic replace that follows keeps the owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import posixpath
import zlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.service.e2b import binding as b
from smartvm.service.e2b.errors import http_error, http_error_for

#: the most a gzip-encoded upload may expand to (a decompression bomb stops here)
MAX_GUNZIPPED = 16 * 1024 * 1024 * 1024
_QUEUE_CHUNKS = 8  # multipart: chunks in flight between the parser and the guest


async def health(request: Request) -> Response:
    return Response(status_code=204)


async def _target_path(request: Request, path: str | None) -> tuple[str, str | None]:
    binding = b.current()
    user = request.query_params.get("username") or b.request_user(request.headers, binding)
    if not path:
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "the path query parameter is missing; name the file")
    return await b.absolute(user, path), user


async def download(request: Request) -> Response:
    try:
        path, _ = await _target_path(request, request.query_params.get("path"))
        chunks = b.current().target.files.read_stream(path)
        first = await anext(chunks, None)  # errors (missing file, a directory) before any header
    except SmartVMError as exc:
        return http_error_for(exc)

    async def body() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(chunks):
            if first is not None:
                yield first
                async for chunk in chunks:
                    yield chunk

    headers = {"Content-Disposition": _attachment(posixpath.basename(path))}
    return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)


def _attachment(name: str) -> str:
    """A Content-Disposition for any file name (RFC 6266): an ASCII ``filename`` for old clients and
    the exact name, percent-encoded, in ``filename*`` (a header is Latin-1 bytes on the wire)."""
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f'attachment; filename="{plain}"; filename*={email.utils.encode_rfc2231(name, "utf-8")}'


async def upload(request: Request) -> Response:
    content_type, options = parse_options_header(request.headers.get("content-type"))
    try:
        if content_type == b"multipart/form-data":
            boundary = options.get(b"boundary")
            if not boundary:
                return http_error(400, "the multipart/form-data body has no boundary")
            written = await _upload_multipart(request, boundary)
        else:
            path, user = await _target_path(request, request.query_params.get("path"))
            written = [await _write(path, user, _body(request))]
    except SmartVMError as exc:
        return http_error_for(exc)
    except _BadBody as exc:
        return http_error(400, str(exc))
    return JSONResponse([{"path": p, "name": posixpath.basename(p), "type": "file"} for p in written])


class _BadBody(Exception):
    """The request body is not what its headers say (bad gzip, broken multipart)."""


async def _body(request: Request) -> AsyncGenerator[bytes, None]:
    """The request body as it arrives, gunzipped when it says ``Content-Encoding: gzip``."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        async for chunk in request.stream():
            yield chunk
        return
    if encoding != "gzip":
        raise _BadBody(f"Content-Encoding {encoding!r} is not supported; send identity or gzip")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    try:
        async for chunk in request.stream():
            out = inflater.decompress(chunk, 1 << 20)
            while True:
                total += len(out)
                if total > MAX_GUNZIPPED:
                    raise _BadBody(f"the gzip body expands beyond {MAX_GUNZIPPED} bytes")
                if out:
                    yield out
                if not inflater.unconsumed_tail:
                    break
                out = inflater.decompress(inflater.unconsumed_tail, 1 << 20)
        if not inflater.eof:
            raise _BadBody("the gzip body is truncated")
    except zlib.error as exc:
        raise _BadBody(f"the gzip body is corrupt: {exc}") from None


async def _write(path: str, user: str | None, chunks: AsyncGenerator[bytes, None]) -> str:
    files = b.current().target.files
    try:
        if user is not None:
            await files.prepare(path, kind="file", user=user)
        await files.write_stream(path, chunks)
    finally:
        await chunks.aclose()
    return path


async def _upload_multipart(request: Request, boundary: bytes) -> list[str]:
    """Each part is a file: its path is the ``path`` query parameter (one file) or its filename."""
    binding = b.current()
    user = request.query_params.get("username") or b.request_user(request.headers, binding)
    single = request.query_params.get("path")
    written: list[str] = []
    headers: dict[str, str] = {}
    field_name, field_value = bytearray(), bytearray()
    parts: list[tuple[str, Any]] = []  # what the parser saw in one feed, replayed below

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        field_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[field_name.decode("latin-1").lower()] = field_value.decode("utf-8", "replace")
        field_name.clear()
        field_value.clear()

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": lambda: headers.clear(),
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": lambda: parts.append(("begin", dict(headers))),
            "on_part_data": lambda data, start, end: parts.append(("data", bytes(data[start:end]))),
            "on_part_end": lambda: parts.append(("end", None)),
        },
    )
    queue: asyncio.Queue[bytes | None] | None = None
    writer: asyncio.Task[str] | None = None

    async def from_queue(q: asyncio.Queue[bytes | None]) -> AsyncGenerator[bytes, None]:
        while (chunk := await q.get()) is not None:
            yield chunk

    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except Exception as exc:
                raise _BadBody(f"the multipart body is malformed: {exc}") from None
            for kind, value in parts:
                if kind == "begin":
                    _, disposition = parse_options_header(value.get("content-disposition", ""))
                    name = single or disposition.get(b"filename", b"").decode()
                    path = await b.absolute(user, name)
                    queue = asyncio.Queue(_QUEUE_CHUNKS)
                    writer = asyncio.create_task(_write(path, user, from_queue(queue)))
                elif kind == "data" and queue is not None and writer is not None:
                    await _put(queue, writer, value)
                elif kind == "end" and queue is not None and writer is not None:
                    await _put(queue, writer, None)
                    written.append(await writer)
                    queue = writer = None
            parts.clear()
        if writer is not None:
            raise _BadBody("the multipart body ended in the middle of a file")
    finally:
        if writer is not None and not writer.done():
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, SmartVMError):
                await writer
    if not written:
        raise _BadBody("the multipart body has no file part")
    return written


async def _put(queue: asyncio.Queue[bytes | None], writer: asyncio.Task[str], item: bytes | None) -> None:
    """Queue a chunk for the guest writer; a writer that failed raises its error here, not a hang."""
    put = asyncio.ensure_future(queue.put(item))
    done, _ = await asyncio.wait({put, writer}, return_when=asyncio.FIRST_COMPLETED)
    if put not in done:
        put.cancel()
        writer.result()  # raises the writer's error
        raise SmartVMError(ErrorCode.AGENT_ERROR, "the guest write ended before the upload did")
