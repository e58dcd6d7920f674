"""S3 ListObjectsV2 over plain HTTPS (public buckets only), following continuation tokens.

The Firecracker CI bucket holds far more than the 1000 keys one page returns, so every listing
pages until ``IsTruncated`` is false. Parsing uses the stdlib; documents with a DOCTYPE are
refused (no entity tricks from a mirror).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

import httpx

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.download import fetch_bytes

MAX_PAGES = 1000


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str | None = None


@dataclass(frozen=True)
class S3Listing:
    """Every object and common prefix under one prefix, all pages merged."""

    objects: list[S3Object] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Page:
    objects: list[S3Object]
    prefixes: list[str]
    truncated: bool
    next_token: str | None


def object_url(bucket_url: str, key: str) -> str:
    """The public HTTPS address of ``key`` in a path-style bucket URL."""
    return f"{bucket_url.rstrip('/')}/{quote(key, safe='/')}"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(elem: ET.Element, name: str) -> str | None:
    for child in elem:
        if _local(child.tag) == name:
            return child.text or ""
    return None


def parse_page(body: bytes, url: str) -> _Page:
    """One ListObjectsV2 response document (namespace-agnostic)."""
    if b"<!DOCTYPE" in body[:4096].upper():
        raise SmartVMError(
            ErrorCode.DOWNLOAD_FAILED, f"listing {url} contains a DOCTYPE; refusing to parse it"
        )
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise SmartVMError(ErrorCode.DOWNLOAD_FAILED, f"listing {url} is not valid XML: {exc}") from exc
    if _local(root.tag) != "ListBucketResult":
        raise SmartVMError(
            ErrorCode.DOWNLOAD_FAILED,
            f"listing {url} is not an S3 ListBucketResult (got <{_local(root.tag)}>)",
        )
    objects: list[S3Object] = []
    prefixes: list[str] = []
    for child in root:
        kind = _local(child.tag)
        if kind == "Contents":
            key = _child_text(child, "Key")
            size_text = _child_text(child, "Size")
            if not key or size_text is None or not size_text.strip().isdigit():
                raise SmartVMError(
                    ErrorCode.DOWNLOAD_FAILED, f"listing {url} has an object without Key or Size"
                )
            etag = _child_text(child, "ETag")
            objects.append(S3Object(key=key, size=int(size_text), etag=etag.strip('"') if etag else None))
        elif kind == "CommonPrefixes":
            prefix = _child_text(child, "Prefix")
            if prefix:
                prefixes.append(prefix)
    truncated = (_child_text(root, "IsTruncated") or "false").strip().lower() == "true"
    token = _child_text(root, "NextContinuationToken")
    return _Page(objects, prefixes, truncated, token or None)


async def list_objects(
    bucket_url: str, prefix: str, *, client: httpx.AsyncClient, delimiter: str | None = None
) -> S3Listing:
    """All keys under ``prefix`` (and, with a delimiter, the common prefixes), every page fetched."""
    objects: list[S3Object] = []
    prefixes: list[str] = []
    token: str | None = None
    seen: set[str] = set()
    base = bucket_url.rstrip("/") + "/"
    for _ in range(MAX_PAGES):
        params = {"list-type": "2", "prefix": prefix}
        if delimiter:
            params["delimiter"] = delimiter
        if token:
            params["continuation-token"] = token
        url = f"{base}?{urlencode(params)}"
        page = parse_page(await fetch_bytes(url, client=client), url)
        objects.extend(page.objects)
        prefixes.extend(page.prefixes)
        if not page.truncated:
            return S3Listing(objects, prefixes)
        if page.next_token is None or page.next_token in seen:
            raise SmartVMError(
                ErrorCode.DOWNLOAD_FAILED,
                f"listing {url} is truncated but gives no new continuation token; the bucket is broken",
            )
        seen.add(page.next_token)
        token = page.next_token
    raise SmartVMError(
        ErrorCode.DOWNLOAD_FAILED, f"listing {base} (prefix {prefix!r}) exceeded {MAX_PAGES} pages"
    )
