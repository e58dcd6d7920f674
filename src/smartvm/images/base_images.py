"""Base image bundles (a kernel plus a root filesystem) in a verified, size-limited cache.

A bundle comes from one of three places, all ending up alike in ``<cache_dir>/<bundle_id>/``
with a schema-1 ``manifest.json`` whose artifacts are ``path`` entries carrying size and sha256:

- the Firecracker CI bucket (presets ``latest`` and ``lts``), listed with S3 ListObjectsV2 in
  both the per-release layout ``firecracker-ci/vX.Y/<arch>/`` and the dated layout
  ``firecracker-ci/YYYYMMDD-*/<arch>/`` (newest first);
- a hosted or local manifest (preset ``hosted``);
- artifacts built on this machine (:meth:`BaseImageManager.register_local_bundle`).

A bundle is prepared in a private ``.tmp-*`` directory and renamed into place, under a per-bundle
``flock`` so concurrent processes download it once. Served bundles are re-verified (size and
sha256) and fetched again when damaged; the least recently used ones beyond the limit are evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, cast

import httpx

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.atomic_write import write_atomic
from smartvm.host.private_dirs import check_private_dir, ensure_private_dir
from smartvm.host.storage import clone_file
from smartvm.images.build_steps import sha256_file
from smartvm.images.download import DEFAULT_TIMEOUT_S, download, http_client
from smartvm.images.manifest import (
    MANIFEST_FILE,
    BundleManifest,
    BundleSource,
    ManifestArtifact,
    ManifestArtifacts,
    RootfsType,
    check_bundle_id,
    check_file_name,
    default_boot_args,
    fetch_manifest,
    read_manifest,
    resolve_artifact_path,
    resolve_artifact_url,
)
from smartvm.images.releases import ImageManager, check_arch, check_version, resolve_ci_bucket_url
from smartvm.images.s3_listing import S3Object, list_objects, object_url

logger = logging.getLogger(__name__)

Preset = Literal["latest", "lts", "hosted"]
PRESETS: tuple[Preset, ...] = ("latest", "lts", "hosted")
DEFAULT_CACHE_DIR = Path("/tmp/.smartvm/base-images")
CI_ROOT = "firecracker-ci/"
LTS_PREFIX = "v1.7"
LTS_FIRECRACKER_VERSION = "v1.7.0"
MAX_CI_CANDIDATES = 8

_LAST_USED = ".last-used"
_LOCKS = ".locks"
_DATED_RE = re.compile(r"^\d{8}-[A-Za-z0-9._-]+$")
_RELEASE_PREFIX_RE = re.compile(r"^v(\d+)\.(\d+)$")
_KERNEL_RE = re.compile(r"^vmlinux-(\d+)\.(\d+)\.(\d+)$")
_ROOTFS_RE = re.compile(r"^ubuntu-(\d+(?:\.\d+)*)\.(squashfs|ext4)$")


@dataclass(frozen=True)
class BaseImageBundle:
    """A ready, verified kernel and rootfs pair in ``bundle_dir``, with what the original SmartVM's
    bundle carries. ``preset`` is where it came from (``latest``, ``lts``, ``hosted`` or ``local``);
    ``ci_version`` the Firecracker CI prefix of a ``latest``/``lts`` bundle. ``kernel_path``,
    ``directory`` and ``source`` are the older names of ``kernel_image_path``, ``bundle_dir`` and
    ``preset``."""

    preset: BundleSource
    arch: str
    ci_version: str | None
    firecracker_version: str | None
    bundle_id: str
    bundle_dir: Path
    kernel_image_path: Path
    rootfs_path: Path
    rootfs_type: RootfsType
    rootfs_is_read_only: bool
    boot_args: str
    kernel_sha256: str
    rootfs_sha256: str
    kernel_size_bytes: int
    rootfs_size_bytes: int
    # times are not part of a bundle's identity (equal bundles hold the same files and settings)
    created_at: datetime = field(compare=False)
    last_accessed_at: datetime = field(compare=False)

    @property
    def kernel_path(self) -> Path:
        return self.kernel_image_path

    @property
    def directory(self) -> Path:
        """The bundle's cache directory (holds ``manifest.json``)."""
        return self.bundle_dir

    @property
    def source(self) -> BundleSource:
        return self.preset


@dataclass(frozen=True)
class _PlannedFile:
    """One artifact to bring into a bundle: from ``url`` or from a local ``path``."""

    file_name: str
    url: str | None = None
    path: Path | None = None
    sha256: str | None = None
    size: int | None = None
    md5: str | None = None


@dataclass(frozen=True)
class _Plan:
    bundle_id: str
    arch: str
    rootfs_type: RootfsType
    boot_args: str
    firecracker_version: str | None
    source: BundleSource
    kernel: _PlannedFile
    rootfs: _PlannedFile
    rootfs_is_read_only: bool | None = None
    ci_version: str | None = None
    name: str | None = None

    def recorded(self) -> tuple[object, ...]:
        """What the cached manifest must say besides the files (rewritten in place when it differs)."""
        return (
            self.boot_args,
            self.firecracker_version,
            self.source,
            self.rootfs_is_read_only,
            self.ci_version,
            self.name,
        )


@dataclass(frozen=True)
class _Stamp:
    """What a file looked like when its sha256 was last computed (any write changes ctime)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Stamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class BaseImageManager:
    """Finds, downloads, verifies and caches base image bundles; async first."""

    def __init__(
        self,
        cache_dir: Path = DEFAULT_CACHE_DIR,
        max_stored_base_images: int = 2,
        *,
        arch: str = "x86_64",
        ci_bucket_url: str | None = None,
        release_base_url: str | None = None,
        manifest_url: str | None = None,
        manifest_path: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        progress: bool | None = None,
    ) -> None:
        if (
            isinstance(max_stored_base_images, bool)
            or not isinstance(max_stored_base_images, int)
            or max_stored_base_images < 1
        ):
            raise SmartVMError(
                ErrorCode.INVALID_BASE_IMAGE_CACHE_LIMIT,
                f"max_stored_base_images must be a positive integer, got {max_stored_base_images!r}",
            )
        self._cache_dir = Path(os.path.abspath(cache_dir))
        self._max = max_stored_base_images
        self.arch = check_arch(arch)
        self.ci_bucket_url = resolve_ci_bucket_url(ci_bucket_url)
        self._releases = ImageManager(
            self._cache_dir.parent, arch=arch, release_base_url=release_base_url, timeout=timeout
        )
        self.release_base_url = self._releases.release_base_url
        self.manifest_url = manifest_url
        self.manifest_path = manifest_path
        self.timeout = timeout
        self.progress = progress
        self._verified: dict[Path, tuple[_Stamp, str]] = {}

    def get_cache_dir(self) -> Path:
        return self._cache_dir

    def get_max_stored_base_images(self) -> int:
        return self._max

    # --- public API ----------------------------------------------------------------------

    async def ensure_base_image(
        self,
        preset: Preset = "latest",
        arch: str | None = None,
        force_download: bool = False,
        manifest_url: str | None = None,
        manifest_path: Path | None = None,
    ) -> BaseImageBundle:
        """A verified bundle for ``preset``: from the cache when intact, else freshly prepared.

        ``latest`` and ``lts`` come from the Firecracker CI bucket (BASE_IMAGE_RESOLVE_FAILED when
        its listing yields no bundle). A manifest (call arguments first, then the constructor's; a
        path wins over a URL) means the hosted source whatever the preset; ``hosted`` without one
        is BASE_IMAGE_MANIFEST_FAILED. When the CI bucket cannot be reached, the newest intact
        cached bundle of the same preset is served with a warning. Preparation failures raise
        BASE_IMAGE_PREPARE_FAILED and leave nothing behind.
        """
        arch = check_arch(arch or self.arch)
        if preset not in PRESETS:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"preset {preset!r} is unknown; use one of {PRESETS}"
            )
        source = self._manifest_source(manifest_url, manifest_path)
        async with http_client(self.timeout) as client:
            if source is not None:
                plan = await self._plan_hosted(arch, client, *source)
            elif preset == "hosted":
                raise SmartVMError(
                    ErrorCode.BASE_IMAGE_MANIFEST_FAILED,
                    "preset 'hosted' needs a manifest: pass manifest_url or manifest_path (or set "
                    "base_image_manifest_url / base_image_manifest_path in SmartVMOptions)",
                )
            else:
                try:
                    plan = await self._plan_ci_preset(preset, arch, client)
                except SmartVMError as exc:
                    fallback = None
                    if not force_download and _is_unreachable(exc):
                        fallback = await asyncio.to_thread(self._newest_intact, preset, arch)
                    if fallback is None:
                        raise _resolve_failed(preset, self.ci_bucket_url, exc) from exc
                    logger.warning(
                        "cannot resolve base image preset %r (%s); serving cached bundle %s",
                        preset,
                        exc.message,
                        fallback.bundle_id,
                    )
                    self._touch(fallback.directory)
                    return self._read_bundle(fallback.directory) or fallback
            bundle = await self._ensure_plan(plan, client, force_download)
        await asyncio.to_thread(self.prune_base_image_cache, bundle.bundle_id)
        return bundle

    def register_local_bundle(
        self,
        bundle_id: str,
        kernel_path: Path,
        rootfs_path: Path,
        rootfs_type: RootfsType,
        boot_args: str,
        firecracker_version: str | None = None,
    ) -> BaseImageBundle:
        """Put locally built artifacts into the cache as bundle ``bundle_id`` (source ``local``).

        The files are cloned copy-on-write; an intact bundle with the same id and content is
        reused. Blocking (hashes the files): call it through ``asyncio.to_thread`` from async code.
        """
        try:
            check_bundle_id(bundle_id)
            if rootfs_type not in ("ext4", "squashfs"):
                raise ValueError(f"rootfs_type {rootfs_type!r} must be 'ext4' or 'squashfs'")
            if "\n" in boot_args or "\x00" in boot_args:
                raise ValueError("boot_args must be one line")
        except ValueError as exc:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, str(exc)) from exc
        fc_version = check_version(firecracker_version) if firecracker_version is not None else None
        files = []
        for role, raw in (("kernel", kernel_path), ("rootfs", rootfs_path)):
            path = Path(os.path.abspath(raw))
            try:
                name = check_file_name(path.name)
                if not path.is_file():
                    raise ValueError(f"{role} {path} is not a file")
            except ValueError as exc:
                raise SmartVMError(ErrorCode.INVALID_ARGUMENT, str(exc)) from exc
            files.append(_PlannedFile(file_name=name, path=path, sha256=self._source_sha256(path)))
        if files[0].file_name == files[1].file_name:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"kernel and rootfs must have different file names ({files[0].file_name})",
            )
        plan = _Plan(bundle_id, self.arch, rootfs_type, boot_args, fc_version, "local", files[0], files[1])
        with self._lock_sync(bundle_id):
            bundle = self._reuse(plan)
            if bundle is None:
                staging = self._staging_dir(bundle_id)
                try:
                    results = [self._copy_local(f, staging) for f in (plan.kernel, plan.rootfs)]
                    bundle = self._commit(plan, staging, results)
                except (SmartVMError, OSError) as exc:
                    raise _prepare_failed(plan, exc) from exc
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        self.prune_base_image_cache(bundle.bundle_id)
        return bundle

    def list_cached_bundles(self) -> list[BaseImageBundle]:
        """Bundles with a valid manifest, most recently used first (not re-hashed)."""
        found: list[tuple[int, BaseImageBundle]] = []
        for entry in self._bundle_dirs():
            bundle = self._read_bundle(entry)
            if bundle is not None:
                found.append((self._last_used(entry), bundle))
        found.sort(key=lambda item: (item[0], item[1].bundle_id), reverse=True)
        return [bundle for _, bundle in found]

    def prune_base_image_cache(self, keep_bundle_id: str | None = None) -> list[str]:
        """Evict least recently used bundles beyond the limit; returns the evicted ids.

        ``keep_bundle_id`` is never evicted. Bundles another process holds locked are skipped;
        leftovers of interrupted preparations are removed too.
        """
        self._sweep_leftovers()
        ordered = [b.bundle_id for b in self.list_cached_bundles()]
        if keep_bundle_id in ordered:
            ordered.remove(keep_bundle_id)
            ordered.insert(0, keep_bundle_id)
        evicted: list[str] = []
        for bundle_id in ordered[self._max :]:
            with self._try_lock(bundle_id) as locked:
                if not locked:
                    continue
                logger.warning(
                    "evicting base image bundle %s (least recently used; the cache keeps at most %d)",
                    bundle_id,
                    self._max,
                )
                try:
                    self._remove_dir(self._cache_dir / bundle_id)
                except OSError as exc:
                    logger.warning("cannot evict base image bundle %s: %s", bundle_id, exc)
                    continue
                evicted.append(bundle_id)
        return evicted

    # --- planning --------------------------------------------------------------------------

    def _manifest_source(
        self, manifest_url: str | None, manifest_path: Path | None
    ) -> tuple[str | None, Path | None] | None:
        """The manifest to use: the call's, else the constructor's; a path wins over a URL."""
        if manifest_url is None and manifest_path is None:
            manifest_url, manifest_path = self.manifest_url, self.manifest_path
        if manifest_path is not None:
            if manifest_url is not None:
                logger.info("both a manifest path and URL are set; using the path %s", manifest_path)
            return None, Path(manifest_path)
        return None if manifest_url is None else (manifest_url, None)

    async def _plan_ci_preset(self, preset: Preset, arch: str, client: httpx.AsyncClient) -> _Plan:
        if preset == "lts":
            return await self._plan_ci(preset, arch, client, [LTS_PREFIX], LTS_FIRECRACKER_VERSION)
        version = await self._releases.get_latest_version()
        top = await list_objects(self.ci_bucket_url, CI_ROOT, client=client, delimiter="/")
        names = [p[len(CI_ROOT) :].rstrip("/") for p in top.prefixes if p.startswith(CI_ROOT)]
        return await self._plan_ci(preset, arch, client, ci_candidates(names, version), version)

    async def _plan_ci(
        self, preset: Preset, arch: str, client: httpx.AsyncClient, candidates: list[str], version: str
    ) -> _Plan:
        for prefix in candidates[:MAX_CI_CANDIDATES]:
            key_prefix = f"{CI_ROOT}{prefix}/{arch}/"
            listing = await list_objects(self.ci_bucket_url, key_prefix, client=client)
            picked = pick_ci_artifacts(listing.objects, key_prefix)
            if picked is None:
                logger.info("no usable kernel and rootfs under %s; trying an older prefix", key_prefix)
                continue
            kernel, rootfs = picked
            kernel_name = kernel.key[len(key_prefix) :]
            rootfs_name = rootfs.key[len(key_prefix) :]
            rootfs_type = cast(RootfsType, rootfs_name.rsplit(".", 1)[1])
            bundle_id = f"ci-{prefix}-{arch}-{kernel_name}-{rootfs_name}"
            try:
                check_bundle_id(bundle_id)
            except ValueError as exc:
                raise SmartVMError(ErrorCode.BASE_IMAGE_RESOLVE_FAILED, str(exc)) from exc
            return _Plan(
                bundle_id=bundle_id,
                arch=arch,
                rootfs_type=rootfs_type,
                boot_args=default_boot_args(arch, rootfs_type),
                firecracker_version=version,
                source=preset,
                kernel=_ci_file(self.ci_bucket_url, kernel, kernel_name),
                rootfs=_ci_file(self.ci_bucket_url, rootfs, rootfs_name),
                ci_version=prefix,
            )
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_RESOLVE_FAILED,
            f"no {arch} kernel (vmlinux-X.Y.Z) and ubuntu rootfs found in {self.ci_bucket_url} under "
            f"{CI_ROOT}{{{','.join(candidates[:MAX_CI_CANDIDATES])}}}/{arch}/; try another preset or a "
            "hosted manifest, or build images locally",
        )

    async def _plan_hosted(
        self, arch: str, client: httpx.AsyncClient, manifest_url: str | None, manifest_path: Path | None
    ) -> _Plan:
        path: Path | None = None
        if manifest_url is not None:
            manifest = await fetch_manifest(manifest_url, client=client, arch=arch)
            base_url = manifest_url
        else:
            assert manifest_path is not None
            path = Path(manifest_path).absolute()  # noqa: ASYNC240 (no I/O: joins with the cwd)
            manifest = await asyncio.to_thread(read_manifest, path, arch=arch)
            base_url = ""  # a manifest file's URLs are absolute (read_manifest checks)
        files: list[_PlannedFile] = []
        for artifact in _artifacts(manifest):
            if artifact.url is not None:
                url = resolve_artifact_url(artifact, base_url)
                files.append(
                    _PlannedFile(artifact.name, url=url, sha256=artifact.sha256, size=artifact.size_bytes)
                )
            else:
                assert path is not None  # fetch_manifest refuses 'path' artifacts
                local = resolve_artifact_path(artifact, path.parent, where=str(path))
                # without a declared digest, the source's own decides whether the cache is current
                digest = artifact.sha256 or await asyncio.to_thread(self._source_sha256, local)
                files.append(_PlannedFile(artifact.name, path=local, sha256=digest, size=artifact.size_bytes))
        return _Plan(
            bundle_id=manifest.bundle_id,
            arch=arch,
            rootfs_type=manifest.rootfs_type,
            boot_args=manifest.effective_boot_args(),
            firecracker_version=manifest.firecracker_version,
            source="hosted",
            kernel=files[0],
            rootfs=files[1],
            rootfs_is_read_only=manifest.rootfs_is_read_only,
            name=manifest.name,
        )

    # --- preparing ---------------------------------------------------------------------------

    async def _ensure_plan(self, plan: _Plan, client: httpx.AsyncClient, force: bool) -> BaseImageBundle:
        async with self._lock_async(plan.bundle_id):
            if not force:
                bundle = await asyncio.to_thread(self._reuse, plan)
                if bundle is not None:
                    return bundle
            staging = self._staging_dir(plan.bundle_id)
            try:
                results = []
                for planned in (plan.kernel, plan.rootfs):
                    if planned.url is not None:
                        got = await download(
                            planned.url,
                            staging / planned.file_name,
                            sha256=planned.sha256,
                            size=planned.size,
                            md5=planned.md5,
                            client=client,
                            progress=self.progress,
                        )
                        results.append((got.size, got.sha256))
                    else:
                        results.append(await asyncio.to_thread(self._copy_local, planned, staging))
                return await asyncio.to_thread(self._commit, plan, staging, results)
            except (SmartVMError, OSError) as exc:
                raise _prepare_failed(plan, exc) from exc
            finally:
                await asyncio.to_thread(shutil.rmtree, staging, True)

    def _copy_local(self, planned: _PlannedFile, staging: Path) -> tuple[int, str]:
        assert planned.path is not None
        dest = staging / planned.file_name
        clone_file(planned.path, dest)
        size, digest = dest.stat().st_size, sha256_file(dest)
        if planned.size is not None and size != planned.size:
            raise SmartVMError(
                ErrorCode.BASE_IMAGE_PREPARE_FAILED,
                f"{planned.path}: size mismatch: expected {planned.size} bytes, got {size}",
            )
        if planned.sha256 is not None and digest != planned.sha256:
            raise SmartVMError(
                ErrorCode.BASE_IMAGE_PREPARE_FAILED,
                f"{planned.path}: sha256 mismatch: expected {planned.sha256}, got {digest}",
            )
        return size, digest

    def _commit(self, plan: _Plan, staging: Path, results: list[tuple[int, str]]) -> BaseImageBundle:
        """Write the manifest into the staged directory and rename it into place."""
        manifest = _manifest_for(plan, results)
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
        (staging / _LAST_USED).write_text(f"{time.time_ns()}\n")
        for name in os.listdir(staging):
            with open(staging / name, "rb") as fh:
                os.fsync(fh.fileno())
        stamps = {
            p.file_name: (_Stamp.of((staging / p.file_name).stat()), digest)
            for p, (_, digest) in zip((plan.kernel, plan.rootfs), results, strict=True)
        }
        target = self._cache_dir / plan.bundle_id
        if target.exists():
            self._remove_dir(target)
        os.rename(staging, target)
        for name, known in stamps.items():  # renaming the directory leaves the files' stamps alone
            self._verified[target / name] = known
        return self._bundle_from(manifest, target)

    def _reuse(self, plan: _Plan) -> BaseImageBundle | None:
        """The cached bundle for ``plan`` if it is intact and holds the planned files."""
        directory = self._cache_dir / plan.bundle_id
        if not directory.is_dir():
            return None
        manifest = self._read_manifest(directory)
        if manifest is None:
            return None
        for planned, cached in zip((plan.kernel, plan.rootfs), _artifacts(manifest), strict=True):
            if (
                cached.name != planned.file_name
                or (planned.sha256 is not None and cached.sha256 != planned.sha256)
                or (planned.size is not None and cached.size_bytes != planned.size)
            ):
                logger.info(
                    "cached bundle %s differs from what was requested; preparing it again", plan.bundle_id
                )
                return None
        if manifest.rootfs_type != plan.rootfs_type:
            return None
        problem = self._verify(directory, manifest)
        if problem is not None:
            logger.warning(
                "cached base image bundle %s is damaged (%s); downloading it again", plan.bundle_id, problem
            )
            return None
        if _recorded(manifest) != plan.recorded():
            manifest = manifest.model_copy(
                update={
                    "boot_args": plan.boot_args,
                    "firecracker_version": plan.firecracker_version,
                    "source": plan.source,
                    "rootfs_is_read_only": plan.rootfs_is_read_only,
                    "ci_version": plan.ci_version,
                    "name": plan.name,
                }
            )
            write_atomic(directory / MANIFEST_FILE, manifest.to_json(), mode=0o644)
        self._touch(directory)
        return self._bundle_from(manifest, directory)

    def _newest_intact(self, preset: Preset, arch: str) -> BaseImageBundle | None:
        for bundle in self.list_cached_bundles():
            if bundle.source != preset or bundle.arch != arch:
                continue
            with self._try_lock(bundle.bundle_id) as locked:
                if not locked:
                    continue
                manifest = self._read_manifest(bundle.directory)
                if manifest is not None and self._verify(bundle.directory, manifest) is None:
                    return bundle
        return None

    # --- verification ----------------------------------------------------------------------

    def _verify(self, directory: Path, manifest: BundleManifest) -> str | None:
        """None when every artifact has its recorded size and sha256, else what is wrong."""
        for artifact in _artifacts(manifest):
            path = directory / artifact.name
            try:
                st = path.stat()
            except OSError:
                return f"{artifact.name} is missing"
            if artifact.size_bytes is not None and st.st_size != artifact.size_bytes:
                return f"{artifact.name} has {st.st_size} bytes, expected {artifact.size_bytes}"
            try:
                if artifact.sha256 is not None and self._sha256(path) != artifact.sha256:
                    return f"{artifact.name} does not match its sha256"
            except OSError as exc:
                return f"{artifact.name} cannot be read ({exc.strerror or exc})"
        return None

    def _source_sha256(self, path: Path) -> str:
        try:
            return self._sha256(path)
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.BASE_IMAGE_PREPARE_FAILED, f"cannot read {path}: {exc.strerror or exc}"
            ) from exc

    def _sha256(self, path: Path) -> str:
        """sha256 of ``path``, recomputed unless this process hashed the unchanged file before."""
        stamp = _Stamp.of(path.stat())
        known = self._verified.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        digest = sha256_file(path)
        if _Stamp.of(path.stat()) == stamp:
            self._verified[path] = (stamp, digest)
        return digest

    # --- cache directory -----------------------------------------------------------------

    def _bundle_dirs(self) -> list[Path]:
        """Bundle directories in a cache that is ours; a bundle another user planted is skipped."""
        if not check_private_dir(self._cache_dir):
            return []
        found = []
        for entry in self._cache_dir.iterdir():
            if entry.name.startswith("."):
                continue
            try:
                if check_private_dir(entry):
                    found.append(entry)
            except SmartVMError as exc:
                logger.warning("ignoring cache entry %s", exc.message)
        return found

    def _read_manifest(self, directory: Path) -> BundleManifest | None:
        try:
            manifest = read_manifest(directory / MANIFEST_FILE, arch=None)
        except SmartVMError as exc:
            logger.info("ignoring cache entry %s: %s", directory, exc.message)
            return None
        if manifest.bundle_id != directory.name:
            logger.info(
                "ignoring cache entry %s: its manifest names bundle %s", directory, manifest.bundle_id
            )
            return None
        for artifact in _artifacts(manifest):
            if artifact.path != artifact.name or artifact.sha256 is None or artifact.size_bytes is None:
                logger.info("ignoring cache entry %s: artifacts are not local files with digests", directory)
                return None
        return manifest

    def _read_bundle(self, directory: Path) -> BaseImageBundle | None:
        manifest = self._read_manifest(directory)
        return None if manifest is None else self._bundle_from(manifest, directory)

    def _bundle_from(self, manifest: BundleManifest, directory: Path) -> BaseImageBundle:
        """The bundle a cached (checked) manifest describes."""
        kernel, rootfs = _artifacts(manifest)
        assert kernel.sha256 and rootfs.sha256 and kernel.size_bytes is not None  # checked on read
        assert rootfs.size_bytes is not None
        return BaseImageBundle(
            preset=manifest.source or "hosted",
            arch=manifest.arch,
            ci_version=manifest.ci_version,
            firecracker_version=manifest.firecracker_version,
            bundle_id=manifest.bundle_id,
            bundle_dir=directory,
            kernel_image_path=directory / kernel.name,
            rootfs_path=directory / rootfs.name,
            rootfs_type=manifest.rootfs_type,
            rootfs_is_read_only=manifest.read_only_rootfs,
            boot_args=manifest.effective_boot_args(),
            kernel_sha256=kernel.sha256,
            rootfs_sha256=rootfs.sha256,
            kernel_size_bytes=kernel.size_bytes,
            rootfs_size_bytes=rootfs.size_bytes,
            created_at=_created_at(manifest, directory / kernel.name),
            last_accessed_at=_from_ns(self._last_used(directory)),
        )

    def _last_used(self, directory: Path) -> int:
        try:
            return int((directory / _LAST_USED).read_text().strip())
        except (OSError, ValueError):
            try:
                return (directory / MANIFEST_FILE).stat().st_mtime_ns
            except OSError:
                return 0

    def _touch(self, directory: Path) -> None:
        with contextlib.suppress(OSError):
            write_atomic(directory / _LAST_USED, f"{time.time_ns()}\n", mode=0o644)

    def _staging_dir(self, bundle_id: str) -> Path:
        """A private directory next to the bundles, so the final rename is atomic."""
        try:
            ensure_private_dir(self._cache_dir)
            return Path(tempfile.mkdtemp(prefix=f".tmp-{bundle_id}-", dir=self._cache_dir))
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.BASE_IMAGE_PREPARE_FAILED,
                f"cannot create a staging directory in {self._cache_dir}: {exc.strerror or exc}",
            ) from exc

    def _remove_dir(self, directory: Path) -> None:
        """Rename aside first so the bundle disappears at once, then delete at leisure."""
        trash = self._cache_dir / f".trash-{directory.name}-{secrets.token_hex(4)}"
        try:
            os.rename(directory, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _sweep_leftovers(self) -> None:
        """Remove ``.trash-*`` and the ``.tmp-*`` of preparations no process is running."""
        try:
            entries = list(self._cache_dir.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.startswith(".trash-"):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(".tmp-") and entry.is_dir():
                bundle_id = entry.name[len(".tmp-") :].rsplit("-", 1)[0]
                try:
                    check_bundle_id(bundle_id)
                except ValueError:
                    continue
                with self._try_lock(bundle_id) as locked:
                    if locked:
                        shutil.rmtree(entry, ignore_errors=True)

    # --- locking -------------------------------------------------------------------------

    def _open_lock(self, bundle_id: str) -> int:
        locks = self._cache_dir / _LOCKS
        try:
            ensure_private_dir(locks)
            return os.open(locks / f"{bundle_id}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.BASE_IMAGE_PREPARE_FAILED,
                f"cannot use the base image cache {self._cache_dir}: {exc.strerror or exc}; "
                "pick a writable cache directory",
            ) from exc

    @contextlib.asynccontextmanager
    async def _lock_async(self, bundle_id: str) -> AsyncIterator[None]:
        """Exclusive per-bundle lock across processes; waits without blocking the event loop."""
        fd = self._open_lock(bundle_id)
        try:
            delay = 0.02
            while not _try_flock(fd):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @contextlib.contextmanager
    def _lock_sync(self, bundle_id: str) -> Iterator[None]:
        fd = self._open_lock(bundle_id)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _try_lock(self, bundle_id: str) -> Iterator[bool]:
        fd = self._open_lock(bundle_id)
        try:
            yield _try_flock(fd)
        finally:
            os.close(fd)


# --- helpers -------------------------------------------------------------------------------


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _artifacts(manifest: BundleManifest) -> tuple[ManifestArtifact, ManifestArtifact]:
    return manifest.artifacts.kernel, manifest.artifacts.rootfs


def _manifest_for(plan: _Plan, results: list[tuple[int, str]]) -> BundleManifest:
    def local(planned: _PlannedFile, result: tuple[int, str]) -> ManifestArtifact:
        size, digest = result
        return ManifestArtifact(
            path=planned.file_name, fileName=planned.file_name, sha256=digest, sizeBytes=size
        )

    return BundleManifest(
        schemaVersion=1,
        bundleId=plan.bundle_id,
        arch=plan.arch,
        firecrackerVersion=plan.firecracker_version,
        rootfsType=plan.rootfs_type,
        rootfsIsReadOnly=plan.rootfs_is_read_only,
        bootArgs=plan.boot_args,
        source=plan.source,
        ciVersion=plan.ci_version,
        name=plan.name,
        createdAt=datetime.now(UTC).isoformat(timespec="seconds"),
        artifacts=ManifestArtifacts(
            kernel=local(plan.kernel, results[0]), rootfs=local(plan.rootfs, results[1])
        ),
    )


def _recorded(manifest: BundleManifest) -> tuple[object, ...]:
    """The fields :meth:`_Plan.recorded` compares, as the cached manifest has them."""
    return (
        manifest.effective_boot_args(),
        manifest.firecracker_version,
        manifest.source,
        manifest.rootfs_is_read_only,
        manifest.ci_version,
        manifest.name,
    )


def _from_ns(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)


def _created_at(manifest: BundleManifest, kernel: Path) -> datetime:
    """``createdAt`` of the manifest; for bundles cached before it was recorded, the kernel's mtime."""
    if manifest.created_at is not None:
        try:
            return datetime.fromisoformat(manifest.created_at)
        except ValueError:
            pass
    try:
        return _from_ns(kernel.stat().st_mtime_ns)
    except OSError:
        return _from_ns(0)


def _resolve_failed(preset: str, bucket: str, exc: SmartVMError) -> SmartVMError:
    if exc.code is ErrorCode.BASE_IMAGE_RESOLVE_FAILED:
        return exc
    return SmartVMError(
        ErrorCode.BASE_IMAGE_RESOLVE_FAILED,
        f"cannot resolve base image preset {preset!r} from the Firecracker CI bucket {bucket}: {exc.message}",
    )


def _prepare_failed(plan: _Plan, exc: BaseException) -> SmartVMError:
    reason = exc.message if isinstance(exc, SmartVMError) else f"{type(exc).__name__}: {exc}"
    return SmartVMError(
        ErrorCode.BASE_IMAGE_PREPARE_FAILED,
        f"preparing base image bundle {plan.bundle_id} failed: {reason}; nothing was kept, retry when fixed",
    )


def _is_unreachable(exc: SmartVMError) -> bool:
    return exc.code in (ErrorCode.DOWNLOAD_FAILED, ErrorCode.VERSION_FETCH_FAILED)


def _ci_file(bucket_url: str, obj: S3Object, name: str) -> _PlannedFile:
    etag = (obj.etag or "").lower()
    md5 = etag if re.fullmatch(r"[0-9a-f]{32}", etag) else None  # multipart ETags are not an MD5
    return _PlannedFile(file_name=name, url=object_url(bucket_url, obj.key), size=obj.size, md5=md5)


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def ci_candidates(prefix_names: list[str], latest_version: str) -> list[str]:
    """CI prefixes to try for ``latest``, newest first: dated, then ``vX.Y`` up to the release's."""
    latest = _version_key(latest_version.lstrip("v"))[:2]
    dated = sorted((n for n in prefix_names if _DATED_RE.match(n)), reverse=True)
    released = []
    for name in prefix_names:
        match = _RELEASE_PREFIX_RE.match(name)
        if match and (int(match.group(1)), int(match.group(2))) <= latest:
            released.append(((int(match.group(1)), int(match.group(2))), name))
    released.sort(reverse=True)
    return dated + [name for _, name in released]


def pick_ci_artifacts(objects: list[S3Object], key_prefix: str) -> tuple[S3Object, S3Object] | None:
    """The newest non-debug ``vmlinux-X.Y.Z`` and the newest ubuntu rootfs (squashfs over ext4)."""
    kernels: list[tuple[tuple[int, ...], S3Object]] = []
    rootfs: list[tuple[tuple[int, tuple[int, ...]], S3Object]] = []
    for obj in objects:
        if not obj.key.startswith(key_prefix):
            continue
        name = obj.key[len(key_prefix) :]
        if kernel := _KERNEL_RE.match(name):
            kernels.append((tuple(int(g) for g in kernel.groups()), obj))
        elif fs := _ROOTFS_RE.match(name):
            rank = 1 if fs.group(2) == "squashfs" else 0
            rootfs.append(((rank, _version_key(fs.group(1))), obj))
    if not kernels or not rootfs:
        return None
    return max(kernels, key=lambda k: k[0])[1], max(rootfs, key=lambda r: r[0])[1]
