"""Firecracker release binaries and loose kernel/rootfs artifacts under one data directory.

Layout: ``<data_dir>/bin/<version>/{firecracker,jailer}``, ``<data_dir>/kernels/<name>``,
``<data_dir>/rootfs/<name>``. Every remote address is configurable (options, then the
``SMARTVM_RELEASE_BASE_URL`` / ``SMARTVM_CI_BUCKET_URL`` environment variables, then the
public defaults) so mirrors and tests can stand in for GitHub and S3.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from pathlib import Path

import httpx

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import check_private_dir, check_private_file, ensure_private_dir
from smartvm.host.storage import clone_file
from smartvm.images.download import (
    DEFAULT_TIMEOUT_S,
    describe_http_error,
    download,
    fetch_text,
    http_client,
    parse_sha256_file,
    safe_extract,
)

DEFAULT_RELEASE_BASE_URL = "https://github.com/firecracker-microvm/firecracker/releases"
DEFAULT_CI_BUCKET_URL = "https://s3.amazonaws.com/spec.ccfc.min"
RELEASE_BASE_ENV = "SMARTVM_RELEASE_BASE_URL"
CI_BUCKET_ENV = "SMARTVM_CI_BUCKET_URL"
ARCHES = ("x86_64", "aarch64")

_VERSION_RE = re.compile(r"^v\d+\.\d+\.\d+$")
_TAG_PATH_RE = re.compile(r"/tag/(v\d+\.\d+\.\d+)/?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def resolve_release_base_url(explicit: str | None = None) -> str:
    """The Firecracker releases base: the option, else ``$SMARTVM_RELEASE_BASE_URL``, else GitHub."""
    return (explicit or os.environ.get(RELEASE_BASE_ENV) or DEFAULT_RELEASE_BASE_URL).rstrip("/")


def resolve_ci_bucket_url(explicit: str | None = None) -> str:
    """The Firecracker CI bucket: the option, else ``$SMARTVM_CI_BUCKET_URL``, else the public bucket."""
    return (explicit or os.environ.get(CI_BUCKET_ENV) or DEFAULT_CI_BUCKET_URL).rstrip("/")


def check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"arch {arch!r} is not supported; use one of {ARCHES}")
    return arch


def check_version(version: str) -> str:
    """``vX.Y.Z`` (a bare ``X.Y.Z`` gets its ``v``); anything else is refused before it reaches a path."""
    candidate = version if version.startswith("v") else f"v{version}"
    if not _VERSION_RE.match(candidate):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"Firecracker version {version!r} must look like v1.15.1"
        )
    return candidate


def check_name(name: str, what: str = "name") -> str:
    """A plain file name for the data directory: no separators, no ``..``, no leading dot."""
    if not _NAME_RE.match(name):
        raise SmartVMError(
            ErrorCode.UNSAFE_PATH,
            f"{what} {name!r} must be 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit",
        )
    return name


async def _require_release(client: httpx.AsyncClient, url: str) -> None:
    """DOWNLOAD_FAILED naming the HTTP error when ``url`` cannot be fetched (nothing is downloaded)."""
    try:
        async with client.stream("GET", url) as response:
            response.raise_for_status()
    except httpx.HTTPError as exc:
        raise SmartVMError(
            ErrorCode.DOWNLOAD_FAILED,
            f"downloading {url} failed: {describe_http_error(exc)}; check the version and any mirror setting",
        ) from exc


class ImageManager:
    """Downloads Firecracker binaries and loose artifacts into ``data_dir``; async first.

    ``ImageManager(data_dir, arch)`` as in the original SmartVM. Every directory it uses is created
    ``0700`` and a binary is used only when it and every directory above it are the current user's
    and not writable by others (``UNSAFE_DIRECTORY`` otherwise; the default data dir is in ``/tmp``).
    """

    def __init__(
        self,
        data_dir: Path = Path("/tmp/.smartvm"),
        arch: str = "x86_64",
        *,
        release_base_url: str | None = None,
        ci_bucket_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        progress: bool | None = None,
        allow_unverified: bool = False,
    ) -> None:
        """``allow_unverified`` installs a release that publishes no checksum (refused otherwise)."""
        self.data_dir = Path(data_dir)
        self.allow_unverified = allow_unverified
        self.arch = check_arch(arch)
        self.release_base_url = resolve_release_base_url(release_base_url)
        self.ci_bucket_url = resolve_ci_bucket_url(ci_bucket_url)
        self.timeout = timeout
        self.progress = progress

    # --- paths ---------------------------------------------------------------------------

    @property
    def bin_dir(self) -> Path:
        return self.data_dir / "bin"

    @property
    def kernels_dir(self) -> Path:
        return self.data_dir / "kernels"

    @property
    def rootfs_dir(self) -> Path:
        return self.data_dir / "rootfs"

    def ensure_directories(self) -> None:
        """Create ``bin/``, ``kernels/`` and ``rootfs/`` in the data dir (each ``0700``), or check the
        ones found (UNSAFE_DIRECTORY when another user could have planted them)."""
        for directory in (self.bin_dir, self.kernels_dir, self.rootfs_dir):
            ensure_private_dir(directory)

    def get_firecracker_path(self, version: str) -> Path:
        return self.bin_dir / check_version(version) / "firecracker"

    def get_jailer_path(self, version: str) -> Path:
        return self.bin_dir / check_version(version) / "jailer"

    def has_binary(self, version: str) -> bool:
        """Both binaries of ``version`` are present, executable and ours (UNSAFE_DIRECTORY when they or
        a directory above them could have been planted by another user)."""
        return all(
            check_private_file(p) and os.access(p, os.X_OK)
            for p in (self.get_firecracker_path(version), self.get_jailer_path(version))
        )

    def list_versions(self) -> list[str]:
        """Versions with both binaries installed, newest first."""
        if not check_private_dir(self.bin_dir):
            return []
        found = [
            p.name for p in self.bin_dir.iterdir() if _VERSION_RE.match(p.name) and self.has_binary(p.name)
        ]
        return sorted(found, key=lambda v: tuple(int(x) for x in v[1:].split(".")), reverse=True)

    # --- remote --------------------------------------------------------------------------

    async def get_latest_version(self) -> str:
        """Follow ``<release base>/latest`` to ``.../tag/vX.Y.Z`` (VERSION_FETCH_FAILED otherwise)."""
        url = f"{self.release_base_url}/latest"
        try:
            async with http_client(self.timeout) as client, client.stream("GET", url) as response:
                response.raise_for_status()
                final = response.url
        except httpx.HTTPError as exc:
            raise SmartVMError(
                ErrorCode.VERSION_FETCH_FAILED,
                f"cannot fetch the latest Firecracker version from {url}: {describe_http_error(exc)}; "
                f"pass a version explicitly or set {RELEASE_BASE_ENV} to a reachable mirror",
            ) from exc
        match = _TAG_PATH_RE.search(final.path)
        if match is None:
            raise SmartVMError(
                ErrorCode.VERSION_FETCH_FAILED,
                f"{url} did not redirect to a release tag (ended at {final}); pass a version explicitly",
            )
        return match.group(1)

    async def download_firecracker(self, version: str) -> Path:
        """Install ``firecracker`` and ``jailer`` of ``version``; returns the firecracker path.

        The tarball is checked against the release's published ``.sha256.txt``; a release without
        one is refused unless ``allow_unverified``. Only regular files are taken from the tarball.
        Binaries appear all at once (a staged directory renamed into place).
        """
        version = check_version(version)
        if self.has_binary(version):
            return self.get_firecracker_path(version)
        tarball = f"firecracker-{version}-{self.arch}.tgz"
        url = f"{self.release_base_url}/download/{version}/{tarball}"
        ensure_private_dir(self.bin_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=self.bin_dir))
        try:
            async with http_client(self.timeout) as client:
                sha256 = await self._published_sha256(client, f"{url}.sha256.txt")
                if sha256 is None and not self.allow_unverified:
                    await _require_release(client, url)  # a missing release says so (HTTP 404)
                    raise SmartVMError(
                        ErrorCode.DOWNLOAD_FAILED,
                        f"Firecracker {version} publishes no checksum ({url}.sha256.txt is missing), "
                        "so the download cannot be verified; use a release that has one, or opt out "
                        "with allow_unverified=True (CLI: --insecure-no-checksum) if you trust the source",
                    )
                archive = staging / tarball
                await download(url, archive, sha256=sha256, client=client, progress=self.progress)
            release_dir = f"release-{version}-{self.arch}"
            names = {
                "firecracker": f"firecracker-{version}-{self.arch}",
                "jailer": f"jailer-{version}-{self.arch}",
            }
            members = [f"{release_dir}/{n}" for n in names.values()]
            extract_dir = staging / "x"
            await asyncio.to_thread(safe_extract, archive, extract_dir, members, links=False)
            final_dir = staging / "out"
            final_dir.mkdir()
            for short, long in names.items():
                (extract_dir / release_dir / long).rename(final_dir / short)
                (final_dir / short).chmod(0o755)
            self._install(final_dir, self.bin_dir / version)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
        return self.get_firecracker_path(version)

    def _install(self, ready: Path, target: Path) -> None:
        """Rename a complete directory into place; keep a complete one another process installed."""
        if target.exists():
            if self.has_binary(target.name):
                return
            shutil.rmtree(target)
        try:
            ready.rename(target)
        except OSError:
            if not self.has_binary(target.name):
                raise

    async def _published_sha256(self, client: httpx.AsyncClient, url: str) -> str | None:
        """The release's checksum, or None when the release publishes none (HTTP 404)."""
        try:
            text = await fetch_text(url, client=client, max_bytes=64 << 10)
        except SmartVMError as exc:
            cause = exc.__cause__
            if isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 404:
                return None
            raise
        try:
            return parse_sha256_file(text)
        except ValueError as exc:
            raise SmartVMError(ErrorCode.DOWNLOAD_FAILED, f"{url} holds no sha256 digest") from exc

    async def download_kernel(
        self, url: str, name: str, *, sha256: str | None = None, size: int | None = None
    ) -> Path:
        """Download a kernel image to ``<data_dir>/kernels/<name>`` (verified when digests are given)."""
        dest = self.kernels_dir / check_name(name, "kernel name")
        await download(url, dest, sha256=sha256, size=size, timeout=self.timeout, progress=self.progress)
        return dest

    async def download_rootfs(
        self, url: str, name: str, *, sha256: str | None = None, size: int | None = None
    ) -> Path:
        """Download a root filesystem image to ``<data_dir>/rootfs/<name>``."""
        dest = self.rootfs_dir / check_name(name, "rootfs name")
        await download(url, dest, sha256=sha256, size=size, timeout=self.timeout, progress=self.progress)
        return dest

    # --- local rootfs helpers ------------------------------------------------------------

    async def create_blank_rootfs(self, name: str, size_mib: int) -> Path:
        """A new empty ext4 image (sparse) at ``<data_dir>/rootfs/<name>`` (ROOTFS_CREATE_FAILED)."""
        dest = self.rootfs_dir / check_name(name, "rootfs name")
        if isinstance(size_mib, bool) or not isinstance(size_mib, int) or size_mib < 1:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"size_mib must be a positive integer, got {size_mib!r}"
            )
        if dest.exists():
            raise SmartVMError(ErrorCode.ROOTFS_CREATE_FAILED, f"{dest} already exists; pick another name")
        mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
        if mkfs is None:
            raise SmartVMError(ErrorCode.ROOTFS_CREATE_FAILED, "mkfs.ext4 not found; install e2fsprogs")
        ensure_private_dir(self.rootfs_dir)
        part = self.rootfs_dir / f".{dest.name}.{os.getpid()}.part"
        try:
            with part.open("wb") as fh:
                fh.truncate(size_mib << 20)
            proc = await asyncio.create_subprocess_exec(
                mkfs, "-F", "-q", "-t", "ext4", str(part),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            try:
                out, _ = await proc.communicate()
            except BaseException:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                raise
            if proc.returncode != 0:
                raise SmartVMError(
                    ErrorCode.ROOTFS_CREATE_FAILED,
                    f"mkfs.ext4 failed for {dest} (exit {proc.returncode}): "
                    f"{out.decode(errors='replace').strip()}",
                )
            os.link(part, dest)
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.ROOTFS_CREATE_FAILED, f"cannot create {dest}: {exc.strerror or exc}"
            ) from exc
        finally:
            part.unlink(missing_ok=True)
        return dest

    async def clone_rootfs(self, source: Path, name: str) -> Path:
        """A copy-on-write copy of ``source`` at ``<data_dir>/rootfs/<name>`` (ROOTFS_CLONE_FAILED)."""
        dest = self.rootfs_dir / check_name(name, "rootfs name")
        source = Path(source)
        if not source.is_file():
            raise SmartVMError(ErrorCode.ROOTFS_CLONE_FAILED, f"source rootfs {source} does not exist")
        if dest.exists():
            raise SmartVMError(ErrorCode.ROOTFS_CLONE_FAILED, f"{dest} already exists; pick another name")
        ensure_private_dir(self.rootfs_dir)
        part = self.rootfs_dir / f".{dest.name}.{os.getpid()}.part"
        try:
            await asyncio.to_thread(clone_file, source, part)
            os.link(part, dest)
        except SmartVMError as exc:
            raise SmartVMError(ErrorCode.ROOTFS_CLONE_FAILED, exc.message) from exc
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.ROOTFS_CLONE_FAILED, f"cannot create {dest}: {exc.strerror or exc}"
            ) from exc
        finally:
            part.unlink(missing_ok=True)
        return dest
