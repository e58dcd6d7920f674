"""Verified, atomic, streaming downloads and safe tar extraction.

A download streams into a hidden ``*.part`` file next to its destination and is renamed into
place only after its size and checksums match, so a crash, a timeout or a bad mirror leaves the
old state or the new one, never a truncated artifact. Every failure names the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import ensure_private_dir

DEFAULT_TIMEOUT_S = 30.0
_CHUNK = 1 << 20
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass(frozen=True)
class DownloadResult:
    """What landed on disk: the final path, its size and its sha256 (hex)."""

    path: Path
    size: int
    sha256: str


def http_client(timeout: float = DEFAULT_TIMEOUT_S) -> httpx.AsyncClient:
    """The client every image download uses: redirects followed, a timeout on every phase."""
    return httpx.AsyncClient(follow_redirects=True, timeout=httpx.Timeout(timeout))


def describe_http_error(exc: BaseException) -> str:
    """A short human reason for an httpx failure (``timed out``, ``HTTP 404 Not Found``, ...)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} {exc.response.reason_phrase}".rstrip()
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return str(exc)


def parse_sha256_file(text: str) -> str:
    """The hex digest from a ``sha256sum``-style file (``<hex>  <name>``)."""
    first = text.strip().split()
    if not first or not _HEX64.match(first[0]):
        raise ValueError("no sha256 digest found")
    return first[0].lower()


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return sys.stderr.isatty()


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: int | None) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout stays clean for the CLI's result line
        transient=True,
    )
    with bar:
        bar.add_task(description, total=total)
        yield bar


def _fail(url: str, reason: str) -> SmartVMError:
    return SmartVMError(
        ErrorCode.DOWNLOAD_FAILED,
        f"downloading {url} failed: {reason}; check the URL, the network and any mirror setting",
    )


async def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    md5: str | None = None,
    client: httpx.AsyncClient | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: bool | None = None,
    mode: int = 0o644,
) -> DownloadResult:
    """Stream ``url`` to ``dest``: ``*.part`` first, renamed only after size and checksums pass.

    ``sha256`` and ``md5`` are hex digests to enforce (``md5`` serves S3 ETags), ``size`` the
    exact byte count. ``progress=None`` shows a bar (on stderr) only when stderr is a terminal.
    ``timeout`` applies when no ``client`` is passed. On any failure nothing is left behind and
    ``SmartVMError(DOWNLOAD_FAILED)`` names the URL.
    """
    if sha256 is not None and not _HEX64.match(sha256):
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"sha256 for {url} must be 64 hex digits")
    if md5 is not None and not _HEX32.match(md5):
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"md5 for {url} must be 32 hex digits")
    ensure_private_dir(dest.parent)
    part = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.part"
    own_client = client is None
    active = client if client is not None else http_client(timeout)
    try:
        result = await _stream_to(active, url, part, dest, sha256, size, md5, progress)
        part.chmod(mode)
        os.replace(part, dest)
        return result
    finally:
        part.unlink(missing_ok=True)
        if own_client:
            await active.aclose()


async def _stream_to(
    client: httpx.AsyncClient,
    url: str,
    part: Path,
    dest: Path,
    sha256: str | None,
    size: int | None,
    md5: str | None,
    progress: bool | None,
) -> DownloadResult:
    sha = hashlib.sha256()
    md = hashlib.md5(usedforsecurity=False) if md5 is not None else None
    written = 0
    try:
        async with client.stream("GET", url) as response:
            response.raise_for_status()
            total = size if size is not None else _content_length(response)
            with (
                part.open("wb") as fh,
                _progress_bar(_show_progress(progress), dest.name, total) as bar,
            ):
                async for chunk in response.aiter_bytes(_CHUNK):
                    written += len(chunk)
                    if size is not None and written > size:
                        raise _fail(url, f"server sent more than the expected {size} bytes")
                    fh.write(chunk)
                    sha.update(chunk)
                    if md is not None:
                        md.update(chunk)
                    if bar is not None:
                        bar.update(bar.task_ids[0], completed=written)
                fh.flush()
                os.fsync(fh.fileno())
    except httpx.HTTPError as exc:
        raise _fail(url, describe_http_error(exc)) from exc
    except OSError as exc:
        raise _fail(url, f"cannot write {part}: {exc.strerror or exc}") from exc
    if size is not None and written != size:
        raise _fail(url, f"size mismatch: expected {size} bytes, got {written}")
    digest = sha.hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise _fail(url, f"sha256 mismatch: expected {sha256.lower()}, got {digest}")
    if md is not None and md5 is not None and md.hexdigest() != md5.lower():
        raise _fail(url, f"md5 mismatch: expected {md5.lower()}, got {md.hexdigest()}")
    return DownloadResult(path=dest, size=written, sha256=digest)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


async def fetch_text(
    url: str,
    *,
    client: httpx.AsyncClient,
    max_bytes: int = 8 << 20,
    code: ErrorCode = ErrorCode.DOWNLOAD_FAILED,
) -> str:
    """A small text document (checksum file, listing page, manifest), bounded in size."""
    body = await fetch_bytes(url, client=client, max_bytes=max_bytes, code=code)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SmartVMError(code, f"{url} did not return UTF-8 text") from exc


async def fetch_bytes(
    url: str,
    *,
    client: httpx.AsyncClient,
    max_bytes: int = 8 << 20,
    code: ErrorCode = ErrorCode.DOWNLOAD_FAILED,
) -> bytes:
    """A small document in memory; refuses bodies over ``max_bytes``. Errors name the URL."""
    chunks: list[bytes] = []
    received = 0
    try:
        async with client.stream("GET", url) as response:
            response.raise_for_status()
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                if received > max_bytes:
                    raise SmartVMError(code, f"fetching {url} failed: response larger than {max_bytes} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        reason = describe_http_error(exc)
        raise SmartVMError(code, f"fetching {url} failed: {reason}; check the URL and the network") from exc
    return b"".join(chunks)


# --- safe tar extraction -----------------------------------------------------------------


def _unsafe(archive: Path, member: tarfile.TarInfo, why: str) -> SmartVMError:
    return SmartVMError(
        ErrorCode.UNSAFE_PATH,
        f"archive {archive.name} has an unsafe member {member.name!r} ({why}); refusing to extract it",
    )


def _inside(root: Path, relative: PurePosixPath) -> bool:
    candidate = Path(os.path.normpath(root / relative))
    return candidate == root or root in candidate.parents


def check_tar_member(archive: Path, member: tarfile.TarInfo, root: Path, *, links: bool = True) -> None:
    """Raise UNSAFE_PATH unless ``member`` stays inside ``root`` (absolute, ``..``, links, devices);
    with ``links=False`` only regular files and directories pass."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith(("/", "\\")):
        raise _unsafe(archive, member, "absolute path")
    if ".." in name.parts:
        raise _unsafe(archive, member, "'..' in path")
    if not _inside(root, name):
        raise _unsafe(archive, member, "path escapes the target directory")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise _unsafe(archive, member, "device or fifo")
    if not links and (member.issym() or member.islnk()):
        raise _unsafe(archive, member, f"link to {member.linkname!r}; only regular files are accepted")
    if member.issym():
        target = PurePosixPath(member.linkname)
        if target.is_absolute() or not _inside(root, name.parent / target):
            raise _unsafe(archive, member, f"symlink to {member.linkname!r} points outside")
    elif member.islnk():
        target = PurePosixPath(member.linkname)
        if target.is_absolute() or ".." in target.parts or not _inside(root, target):
            raise _unsafe(archive, member, f"hardlink to {member.linkname!r} points outside")
    elif not (member.isfile() or member.isdir()):
        raise _unsafe(archive, member, "unsupported member type")


def safe_extract(
    archive: Path, dest: Path, members: Sequence[str] | None = None, *, links: bool = True
) -> list[Path]:
    """Extract ``archive`` (any compression tarfile reads) into ``dest``.

    Every member is checked first, so one unsafe member refuses the whole archive (UNSAFE_PATH);
    ``links=False`` also refuses symlinks and hard links (release binaries must be plain files).
    ``members`` limits what is written (by exact member name). Returns the written paths.
    """
    root = Path(os.path.abspath(dest))
    root.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            infos = tar.getmembers()
            for info in infos:
                check_tar_member(archive, info, root, links=links)
            wanted = infos if members is None else [i for i in infos if i.name in set(members)]
            if members is not None:
                missing = set(members) - {i.name for i in wanted}
                if missing:
                    raise SmartVMError(
                        ErrorCode.DOWNLOAD_FAILED,
                        f"archive {archive.name} lacks {', '.join(sorted(missing))}",
                    )
            tar.extractall(root, members=wanted, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SmartVMError(
            ErrorCode.DOWNLOAD_FAILED, f"cannot extract {archive.name}: {exc}; the download may be damaged"
        ) from exc
    return [root / i.name for i in wanted]
