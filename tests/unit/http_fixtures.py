"""A real HTTP server on 127.0.0.1 standing in for GitHub releases and the Firecracker CI bucket.

It serves what the image code talks to, over real sockets:
- ``/gh/releases/latest`` redirecting to ``/gh/releases/tag/vX.Y.Z`` and release artifacts under
  ``/gh/releases/download/...`` (add them with :meth:`FakeRemote.add_release`);
- an S3-style bucket at ``/s3/bucket`` answering ListObjectsV2 (``?list-type=2``) with small pages,
  continuation tokens and an optional delimiter, and serving objects with an MD5 ETag;
- static routes (manifests, artifacts), ``/status/<code>`` and ``/hang`` (never answers).

Every GET is counted per path (``hits``), so tests can prove a download happened exactly once.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

BUCKET = "/s3/bucket"
RELEASES = "/gh/releases"


@dataclass
class Route:
    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    before: Callable[[], None] | None = None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tar(members: dict[str, bytes], *, mode: int = 0o755) -> bytes:
    """A real gzip tarball of regular files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients hanging up early (timeouts, aborted downloads) are expected here."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class FakeRemote:
    """Routes, an S3 bucket and a GitHub-like release page, all on one loopback server."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.objects: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.object_hooks: dict[str, Callable[[], None]] = {}
        self.listed_sizes: dict[str, int] = {}  # lie about a size in listings
        self.page_size = 2
        self.latest: str | None = None
        self.hits: Counter[str] = Counter()
        self.listings: list[dict[str, str]] = []
        self.released = threading.Event()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    # --- addresses ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def bucket_url(self) -> str:
        return self.url + BUCKET

    @property
    def releases_url(self) -> str:
        return self.url + RELEASES

    # --- content -----------------------------------------------------------------------

    def add(self, path: str, body: bytes | str, status: int = 200, **headers: str) -> str:
        data = body.encode() if isinstance(body, str) else body
        self.routes[path] = Route(data, status, dict(headers))
        return self.url + path

    def put_object(self, key: str, data: bytes, *, etag: str | None = None) -> str:
        self.objects[key] = data
        self.etags[key] = etag if etag is not None else hashlib.md5(data).hexdigest()
        return f"{self.bucket_url}/{key}"

    def add_release(
        self,
        version: str,
        arch: str = "x86_64",
        *,
        publish_sha: bool = True,
        sha_override: str | None = None,
        members: dict[str, bytes] | None = None,
        tarball: bytes | None = None,
    ) -> dict[str, bytes]:
        """A release tarball laid out like Firecracker's; returns the binaries' contents by short name."""
        binaries = {
            "firecracker": f"#!/bin/sh\necho firecracker {version}\n".encode(),
            "jailer": f"#!/bin/sh\necho jailer {version}\n".encode(),
        }
        release_dir = f"release-{version}-{arch}"
        if members is None:
            members = {f"{release_dir}/{name}-{version}-{arch}": data for name, data in binaries.items()}
            members[f"{release_dir}/SHA256SUMS"] = b"unused\n"
        data = tarball if tarball is not None else make_tar(members)
        name = f"firecracker-{version}-{arch}.tgz"
        self.add(f"{RELEASES}/download/{version}/{name}", data)
        if publish_sha:
            digest = sha_override or sha256_hex(data)
            self.add(f"{RELEASES}/download/{version}/{name}.sha256.txt", f"{digest}  {name}\n")
        return binaries

    def total_object_hits(self) -> int:
        return sum(
            n for path, n in self.hits.items() if path.startswith(BUCKET + "/") and path != BUCKET + "/"
        )

    # --- server ------------------------------------------------------------------------

    def start(self) -> FakeRemote:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        remote = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                path = unquote(parts.path)
                with remote._lock:
                    remote.hits[path] += 1
                remote._dispatch(self, path, parse_qs(parts.query))

        return Handler

    def _send(
        self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _dispatch(self, h: BaseHTTPRequestHandler, path: str, query: dict[str, list[str]]) -> None:
        if path == "/hang" or path.startswith("/hang/"):
            self.released.wait(timeout=30)  # never answers; stop() releases it
            return
        if path.startswith("/status/"):
            self._send(h, int(path.split("/")[2]), b"error page\n")  # /status/<code>[/anything]
            return
        if path == f"{RELEASES}/latest" and self.latest is not None:
            self._send(h, 302, b"", {"Location": f"{RELEASES}/tag/{self.latest}"})
            return
        if path.startswith(f"{RELEASES}/tag/"):
            self._send(h, 200, b"<html>release page</html>", {"Content-Type": "text/html"})
            return
        if path in (BUCKET, BUCKET + "/") and query.get("list-type") == ["2"]:
            self._send(h, 200, self._listing(query), {"Content-Type": "application/xml"})
            return
        if path.startswith(BUCKET + "/"):
            key = path[len(BUCKET) + 1 :]
            if key in self.objects:
                hook = self.object_hooks.get(key)
                if hook is not None:
                    hook()
                self._send(h, 200, self.objects[key], {"ETag": f'"{self.etags[key]}"'})
            else:
                self._send(
                    h, 404, b"<Error><Code>NoSuchKey</Code></Error>", {"Content-Type": "application/xml"}
                )
            return
        route = self.routes.get(path)
        if route is None:
            self._send(h, 404, b"not found\n")
            return
        if route.before is not None:
            route.before()
        self._send(h, route.status, route.body, route.headers)

    def _listing(self, query: dict[str, list[str]]) -> bytes:
        prefix = query.get("prefix", [""])[0]
        delimiter = query.get("delimiter", [""])[0]
        token = query.get("continuation-token", [None])[0]
        with self._lock:
            self.listings.append({"prefix": prefix, "token": token or ""})
        entries: dict[str, str] = {}  # sort key -> "key" or "prefix"
        for key in self.objects:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                entries[prefix + rest.split(delimiter, 1)[0] + delimiter] = "prefix"
            else:
                entries[key] = "key"
        ordered = sorted(entries)
        start = 0
        if token:
            after = base64.urlsafe_b64decode(token.encode()).decode()
            start = next((i for i, name in enumerate(ordered) if name > after), len(ordered))
        page = ordered[start : start + self.page_size]
        truncated = start + self.page_size < len(ordered)
        out = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
            f"<Name>bucket</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>",
            f"<MaxKeys>{self.page_size}</MaxKeys>",
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>",
        ]
        if delimiter:
            out.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
        for name in page:
            if entries[name] == "key":
                size = self.listed_sizes.get(name, len(self.objects[name]))
                out.append(
                    f"<Contents><Key>{escape(name)}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
                    f"<ETag>&quot;{self.etags[name]}&quot;</ETag><Size>{size}</Size>"
                    "<StorageClass>STANDARD</StorageClass></Contents>"
                )
            else:
                out.append(f"<CommonPrefixes><Prefix>{escape(name)}</Prefix></CommonPrefixes>")
        if truncated:
            next_token = base64.urlsafe_b64encode(page[-1].encode()).decode()
            out.append(f"<NextContinuationToken>{next_token}</NextContinuationToken>")
        out.append("</ListBucketResult>")
        return "\n".join(out).encode()


@contextlib.contextmanager
def serving() -> Iterator[FakeRemote]:
    """A started server, stopped (hung requests released) on exit. Wrap it in a fixture."""
    server = FakeRemote().start()
    try:
        yield server
    finally:
        server.stop()


# --- a CI bucket in both layouts ----------------------------------------------------------


def kernel_bytes(tag: str) -> bytes:
    return f"ELF kernel {tag}\n".encode() * 64


def rootfs_bytes(tag: str) -> bytes:
    return f"rootfs {tag}\n".encode() * 256


def fill_ci_prefix(remote: FakeRemote, prefix: str, arch: str = "x86_64", *, squashfs: bool = True) -> None:
    """A CI prefix like Firecracker's: several kernels (one debug), ubuntu ext4 and squashfs, noise."""
    base = f"firecracker-ci/{prefix}/{arch}/"
    for name in ("vmlinux-5.10.209", "vmlinux-6.1.99", "vmlinux-6.1.100"):
        remote.put_object(base + name, kernel_bytes(f"{prefix}/{arch}/{name}"))
    remote.put_object(base + "vmlinux-6.1.200.debug", b"debug symbols")
    remote.put_object(base + "vmlinux-6.9.0-no-acpi", b"not this one")
    remote.put_object(base + "ubuntu-22.04.ext4", rootfs_bytes(f"{prefix}/{arch}/ext4"))
    remote.put_object(base + "ubuntu-22.04.id_rsa", b"key")
    if squashfs:
        remote.put_object(base + "ubuntu-22.04.squashfs", rootfs_bytes(f"{prefix}/{arch}/22.04.squashfs"))
        remote.put_object(base + "ubuntu-24.04.squashfs", rootfs_bytes(f"{prefix}/{arch}/24.04.squashfs"))
    remote.put_object(base + "nested/vmlinux-9.9.9", b"not a direct child")
