"""Routes around the API: ``/health`` and the page at ``/test`` (open), ``/metrics`` (needs a key)."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from smartvm.errors import ErrorCode
from smartvm.service.auth import require_api_key
from smartvm.service.deps import service
from smartvm.service.http_errors import error_body
from smartvm.service.metrics import CONTENT_TYPE

public = APIRouter(tags=["service"])
protected = APIRouter(tags=["service"], dependencies=[Depends(require_api_key)])

# Everything the page needs comes from this service; the browser refuses anything else.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' blob:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_FILES = {"test.html": "text/html; charset=utf-8", "app.js": "text/javascript", "app.css": "text/css"}


@cache
def _static(name: str) -> bytes:
    return resources.files("smartvm.service").joinpath("static", name).read_bytes()


def _page_file(name: str) -> Response:
    headers = {
        "Content-Security-Policy": PAGE_POLICY,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }
    return Response(_static(name), media_type=PAGE_FILES[name], headers=headers)


@public.get("/health", summary="200 once the service is ready")
async def health(request: Request) -> JSONResponse:
    if not service(request).ready:
        body = error_body(ErrorCode.SERVICE_UNAVAILABLE, "the service is starting or stopping")
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok"})


@public.get("/test", include_in_schema=False)
async def test_page() -> Response:
    return _page_file("test.html")


@public.get("/test/app.js", include_in_schema=False)
async def test_page_script() -> Response:
    return _page_file("app.js")


@public.get("/test/app.css", include_in_schema=False)
async def test_page_style() -> Response:
    return _page_file("app.css")


@protected.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    ctx = service(request)
    body = ctx.metrics.render(await ctx.backend.count_by_state(), ctx.backend.capacity())
    return Response(body, media_type=CONTENT_TYPE)
