"""The base image bundle manifest, schema 1 (camelCase on disk, snake_case in Python).

One format serves three places: a hosted manifest (artifacts by ``url``), a local manifest
(artifacts by ``path``) and the ``manifest.json`` inside every cached bundle (``path`` relative
to the bundle directory, always with ``sha256`` and ``sizeBytes``). Rule violations raise
``INVALID_BASE_IMAGE_MANIFEST`` naming the field; a manifest that cannot be read or fetched
raises ``BASE_IMAGE_MANIFEST_FAILED``.

Two shapes are accepted. The original SmartVM's, with the artifacts at the top level (there
``firecrackerVersion`` is required)::

    {"schemaVersion": 1, "bundleId": "minimal-v1-x86_64", "name": "minimal bundle",
     "arch": "x86_64", "firecrackerVersion": "v1.15.1", "rootfsType": "ext4",
     "rootfsIsReadOnly": false, "bootArgs": "console=ttyS0 reboot=k panic=1 pci=off",
     "kernel": {"url": "https://example.com/vmlinux", "sha256": "<64 hex>", "sizeBytes": 1234},
     "rootfs": {"url": "rootfs.ext4", "sha256": "<64 hex>", "fileName": "rootfs.ext4"}}

and smartvm's own, with both under ``"artifacts": {"kernel": ..., "rootfs": ...}`` (what the cache
writes). ``rootfsType`` defaults from the rootfs file name (``.squashfs`` or else ext4) and
``rootfsIsReadOnly`` to true for squashfs. A relative ``url`` resolves against the manifest's URL;
a relative ``path`` against the manifest file's directory and must stay inside it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.download import fetch_bytes

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
RootfsType = Literal["ext4", "squashfs"]
BundleSource = Literal["latest", "lts", "hosted", "local"]

_BUNDLE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$")
_FC_VERSION_RE = re.compile(r"^v\d+\.\d+\.\d+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_MANIFEST_BYTES = 1 << 20


def check_bundle_id(value: str) -> str:
    """Letters, digits, ``.``, ``_``, ``-`` (not only dots): safe as one directory name."""
    if not _BUNDLE_ID_RE.match(value) or set(value) == {"."}:
        raise ValueError(
            f"bundleId {value!r} must be 1-128 letters, digits, '.', '_' or '-' (and not only dots)"
        )
    return value


def check_file_name(value: str) -> str:
    """Letters, digits, ``.``, ``_`` and ``-`` only (as the original SmartVM allowed), not starting
    with a dot and not the manifest itself: safe as one file name in a bundle directory."""
    if not _FILE_NAME_RE.match(value) or value == MANIFEST_FILE:
        raise ValueError(
            f"fileName {value!r} must be 1-255 letters, digits, '.', '_' or '-', not starting with '.' "
            f"and not {MANIFEST_FILE!r}"
        )
    return value


def default_boot_args(arch: str, rootfs_type: RootfsType) -> str:
    """Firecracker's CI boot arguments, adjusted for the architecture and the rootfs type."""
    args = ["console=ttyS0", "reboot=k", "panic=1", "pci=off"]
    if arch == "aarch64":
        args.append("keep_bootcon")
    if rootfs_type == "squashfs":
        args += ["ro", "rootfstype=squashfs"]
    return " ".join(args)


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ManifestArtifact(_Model):
    """One file of a bundle: exactly one of ``url`` (with ``sha256``) or ``path``."""

    url: str | None = None
    path: str | None = None
    sha256: str | None = None
    size_bytes: int | None = Field(default=None, alias="sizeBytes", ge=0)
    file_name: str | None = Field(default=None, alias="fileName")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = urlsplit(value).scheme
        if not value or (scheme and scheme not in ("http", "https")):
            raise ValueError(f"url {value!r} must be an http(s) URL or a URL relative to the manifest")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and (not value or "\x00" in value):
            raise ValueError("path must be a non-empty file path")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _SHA256_RE.match(value.lower()):
            raise ValueError(f"sha256 {value!r} must be 64 hex digits")
        return value.lower()

    @field_validator("file_name")
    @classmethod
    def _file_name(cls, value: str | None) -> str | None:
        return None if value is None else check_file_name(value)

    @model_validator(mode="after")
    def _one_source(self) -> ManifestArtifact:
        if (self.url is None) == (self.path is None):
            raise ValueError("exactly one of 'url' or 'path' must be set")
        if self.url is not None and self.sha256 is None:
            raise ValueError("an artifact with a 'url' needs a 'sha256' (64 hex digits)")
        if self.file_name is None:
            source = urlsplit(self.url).path if self.url is not None else (self.path or "")
            derived = PurePosixPath(source.replace("\\", "/")).name
            try:
                check_file_name(derived)
            except ValueError as exc:
                raise ValueError(f"cannot derive a fileName from {source!r}; set 'fileName'") from exc
            object.__setattr__(self, "file_name", derived)
        return self

    @property
    def name(self) -> str:
        """The file name inside the bundle directory (always set after validation)."""
        assert self.file_name is not None  # set by _one_source
        return self.file_name


class ManifestArtifacts(_Model):
    kernel: ManifestArtifact
    rootfs: ManifestArtifact

    @model_validator(mode="after")
    def _distinct(self) -> ManifestArtifacts:
        if self.kernel.name == self.rootfs.name:
            raise ValueError(f"kernel and rootfs share the fileName {self.kernel.name!r}")
        return self


class BundleManifest(_Model):
    """A bundle: id, architecture, Firecracker version, rootfs type, boot args and two artifacts.

    ``ci_version`` (the CI bucket prefix a ``latest``/``lts`` bundle came from) and ``created_at``
    are smartvm's own, written into the cached ``manifest.json``.
    """

    schema_version: int = Field(alias="schemaVersion")
    bundle_id: str = Field(alias="bundleId")
    name: str | None = Field(default=None, max_length=256)
    arch: str
    firecracker_version: str | None = Field(default=None, alias="firecrackerVersion")
    rootfs_type: RootfsType = Field(alias="rootfsType")
    rootfs_is_read_only: bool | None = Field(default=None, alias="rootfsIsReadOnly")
    boot_args: str | None = Field(default=None, alias="bootArgs")
    source: BundleSource | None = None
    ci_version: str | None = Field(default=None, alias="ciVersion", max_length=128)
    created_at: str | None = Field(default=None, alias="createdAt", max_length=64)
    artifacts: ManifestArtifacts

    @model_validator(mode="before")
    @classmethod
    def _original_shape(cls, data: Any) -> Any:
        """Move top-level ``kernel``/``rootfs`` (the original SmartVM's shape) under ``artifacts``,
        and default ``rootfsType`` from the rootfs file name."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "kernel" in data or "rootfs" in data:
            if "artifacts" in data:
                raise ValueError("give the artifacts either as top-level kernel/rootfs or under artifacts")
            if "firecrackerVersion" not in data:
                raise ValueError("firecrackerVersion is required (the Firecracker version tested with it)")
            data["artifacts"] = {k: data.pop(k) for k in ("kernel", "rootfs") if k in data}
        if "rootfsType" not in data:
            rootfs = (
                data.get("artifacts", {}).get("rootfs") if isinstance(data.get("artifacts"), dict) else None
            )
            if isinstance(rootfs, dict):
                named = next(
                    (v for k in ("fileName", "path", "url") if isinstance(v := rootfs.get(k), str)), ""
                )
                data["rootfsType"] = "squashfs" if named.lower().endswith(".squashfs") else "ext4"
        return data

    @property
    def read_only_rootfs(self) -> bool:
        """Whether the rootfs is attached read-only: ``rootfsIsReadOnly``, else true for squashfs."""
        return (
            self.rootfs_is_read_only
            if self.rootfs_is_read_only is not None
            else self.rootfs_type == "squashfs"
        )

    @field_validator("schema_version")
    @classmethod
    def _schema(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"schemaVersion must be {SCHEMA_VERSION}, got {value}")
        return value

    @field_validator("bundle_id")
    @classmethod
    def _bundle_id(cls, value: str) -> str:
        return check_bundle_id(value)

    @field_validator("firecracker_version")
    @classmethod
    def _fc_version(cls, value: str | None) -> str | None:
        if value is not None and not _FC_VERSION_RE.match(value):
            raise ValueError(f"firecrackerVersion {value!r} must look like v1.15.1")
        return value

    @field_validator("boot_args", "name")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and ("\n" in value or "\x00" in value or len(value) > 2048):
            raise ValueError("must be one line of at most 2048 characters")
        return value

    def effective_boot_args(self) -> str:
        return (
            self.boot_args if self.boot_args is not None else default_boot_args(self.arch, self.rootfs_type)
        )

    def to_json(self) -> str:
        """The on-disk form: camelCase keys, unset fields left out."""
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n"


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "manifest"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_manifest(
    data: bytes | str | dict[str, Any], *, where: str, arch: str | None = None
) -> BundleManifest:
    """Validate a manifest document; ``arch`` (when given) must equal the manifest's ``arch``."""
    if not isinstance(data, dict):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SmartVMError(
                ErrorCode.INVALID_BASE_IMAGE_MANIFEST, f"manifest {where} is not valid JSON: {exc}"
            ) from exc
    if not isinstance(data, dict):
        raise SmartVMError(ErrorCode.INVALID_BASE_IMAGE_MANIFEST, f"manifest {where} must be a JSON object")
    try:
        manifest = BundleManifest.model_validate(data)
    except ValidationError as exc:
        raise SmartVMError(
            ErrorCode.INVALID_BASE_IMAGE_MANIFEST, f"manifest {where} is invalid: {_describe(exc)}"
        ) from exc
    if arch is not None and manifest.arch != arch:
        raise SmartVMError(
            ErrorCode.INVALID_BASE_IMAGE_MANIFEST,
            f"manifest {where} is for arch {manifest.arch!r} but {arch!r} was requested",
        )
    return manifest


def resolve_artifact_url(artifact: ManifestArtifact, manifest_url: str) -> str:
    """The absolute URL of a ``url`` artifact (relative ones resolve against the manifest URL)."""
    assert artifact.url is not None
    return urljoin(manifest_url, artifact.url)


def resolve_artifact_path(artifact: ManifestArtifact, manifest_dir: Path, *, where: str) -> Path:
    """The file a ``path`` artifact names; a relative path must stay inside ``manifest_dir``."""
    assert artifact.path is not None
    raw = Path(artifact.path)
    if raw.is_absolute():
        return raw
    root = Path(os.path.abspath(manifest_dir))
    candidate = Path(os.path.normpath(root / raw))
    if root not in candidate.parents:
        raise SmartVMError(
            ErrorCode.INVALID_BASE_IMAGE_MANIFEST,
            f"manifest {where}: path {artifact.path!r} escapes the manifest directory {root}",
        )
    return candidate


async def fetch_manifest(url: str, *, client: httpx.AsyncClient, arch: str) -> BundleManifest:
    """Fetch and validate a hosted manifest. Only ``url`` artifacts are allowed in it."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise SmartVMError(ErrorCode.BASE_IMAGE_MANIFEST_FAILED, f"manifest URL {url!r} must be http(s)")
    body = await fetch_bytes(
        url, client=client, max_bytes=_MAX_MANIFEST_BYTES, code=ErrorCode.BASE_IMAGE_MANIFEST_FAILED
    )
    manifest = parse_manifest(body, where=url, arch=arch)
    for role, artifact in (("kernel", manifest.artifacts.kernel), ("rootfs", manifest.artifacts.rootfs)):
        if artifact.path is not None:
            raise SmartVMError(
                ErrorCode.INVALID_BASE_IMAGE_MANIFEST,
                f"manifest {url}: artifacts.{role} uses 'path'; a hosted manifest must use 'url'",
            )
    return manifest


def read_manifest(path: Path, *, arch: str | None) -> BundleManifest:
    """Read and validate a manifest file. Relative ``url`` artifacts are refused (no base URL)."""
    try:
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise SmartVMError(ErrorCode.BASE_IMAGE_MANIFEST_FAILED, f"manifest {path} is larger than 1 MiB")
        body = path.read_bytes()
    except OSError as exc:
        raise SmartVMError(
            ErrorCode.BASE_IMAGE_MANIFEST_FAILED, f"cannot read manifest {path}: {exc.strerror or exc}"
        ) from exc
    manifest = parse_manifest(body, where=str(path), arch=arch)
    for role, artifact in (("kernel", manifest.artifacts.kernel), ("rootfs", manifest.artifacts.rootfs)):
        if artifact.url is not None and not urlsplit(artifact.url).scheme:
            raise SmartVMError(
                ErrorCode.INVALID_BASE_IMAGE_MANIFEST,
                f"manifest {path}: artifacts.{role}.url {artifact.url!r} is relative; a manifest file needs "
                "absolute URLs",
            )
    return manifest
