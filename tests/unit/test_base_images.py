"""BaseImageManager against a loopback GitHub + S3 stand-in: presets, manifests, cache, eviction, locking."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from http_fixtures import BUCKET, FakeRemote, fill_ci_prefix, kernel_bytes, rootfs_bytes, serving, sha256_hex

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.base_images import BaseImageBundle, BaseImageManager, ci_candidates, pick_ci_artifacts
from smartvm.images.download import http_client
from smartvm.images.s3_listing import S3Object, list_objects

LATEST = "v1.15.1"
LTS_KEYS = "firecracker-ci/v1.7/x86_64/"


@pytest.fixture
def remote() -> Iterator[FakeRemote]:
    with serving() as server:
        server.latest = LATEST
        yield server


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "base-images"


def manager(remote: FakeRemote, cache: Path, limit: int = 2, **kwargs: Any) -> BaseImageManager:
    kwargs.setdefault("timeout", 2)
    return BaseImageManager(
        cache, limit, ci_bucket_url=remote.bucket_url, release_base_url=remote.releases_url, **kwargs
    )


def entries(cache: Path) -> list[str]:
    """Everything in the cache but the lock directory."""
    return sorted(p.name for p in cache.iterdir() if p.name != ".locks") if cache.exists() else []


def hits(remote: FakeRemote, key: str) -> int:
    return remote.hits[f"{BUCKET}/{key}"]


def old_layout(remote: FakeRemote) -> None:
    for prefix in ("v1.7", "v1.14", "v1.15", "v1.16"):
        fill_ci_prefix(remote, prefix)
    remote.put_object("firecracker-ci/v1.11-pcie-poc/x86_64/vmlinux-6.1.1", b"poc")


def new_layout(remote: FakeRemote) -> None:
    fill_ci_prefix(remote, "v1.7")
    fill_ci_prefix(remote, "v1.15")
    fill_ci_prefix(remote, "20260301-0123456789ab-0")
    fill_ci_prefix(remote, "20260915-ba9876543210-0", "aarch64")  # newest, but no x86_64 artifacts


def hosted_manifest(remote: FakeRemote, bundle_id: str = "hosted-1", **overrides: Any) -> str:
    kernel, rootfs = kernel_bytes("hosted"), rootfs_bytes("hosted")
    remote.add("/hosted/files/vmlinux", kernel)
    remote.add("/hosted/files/rootfs.ext4", rootfs)
    doc: dict[str, Any] = {
        "schemaVersion": 1,
        "bundleId": bundle_id,
        "arch": "x86_64",
        "firecrackerVersion": "v1.14.2",
        "rootfsType": "ext4",
        "artifacts": {
            "kernel": {"url": "files/vmlinux", "sha256": sha256_hex(kernel), "sizeBytes": len(kernel)},
            "rootfs": {"url": "files/rootfs.ext4", "sha256": sha256_hex(rootfs), "sizeBytes": len(rootfs)},
        },
    }
    for key, value in overrides.items():
        doc["artifacts"][key].update(value)
    return remote.add(f"/hosted/manifest-{bundle_id}.json", json.dumps(doc))


def assert_bundle_files(bundle: BaseImageBundle, kernel: bytes, rootfs: bytes) -> None:
    assert bundle.kernel_path.read_bytes() == kernel
    assert bundle.rootfs_path.read_bytes() == rootfs
    manifest = json.loads((bundle.directory / "manifest.json").read_text())
    assert manifest["schemaVersion"] == 1 and manifest["bundleId"] == bundle.bundle_id
    assert manifest["artifacts"]["kernel"]["path"] == bundle.kernel_path.name
    assert manifest["artifacts"]["kernel"]["sha256"] == sha256_hex(kernel)
    assert manifest["artifacts"]["rootfs"]["sizeBytes"] == len(rootfs)


# --- presets ---------------------------------------------------------------------------------


async def test_lts_resolution_prefers_newest_kernel_and_squashfs(remote: FakeRemote, cache: Path) -> None:
    old_layout(remote)
    bundle = await manager(remote, cache).ensure_base_image("lts")
    assert bundle.bundle_id == "ci-v1.7-x86_64-vmlinux-6.1.100-ubuntu-24.04.squashfs"
    assert bundle.source == "lts" and bundle.arch == "x86_64"
    assert bundle.firecracker_version == "v1.7.0"
    assert bundle.rootfs_type == "squashfs"
    assert bundle.boot_args == "console=ttyS0 reboot=k panic=1 pci=off ro rootfstype=squashfs"
    assert bundle.directory == cache / bundle.bundle_id
    assert_bundle_files(
        bundle, kernel_bytes("v1.7/x86_64/vmlinux-6.1.100"), rootfs_bytes("v1.7/x86_64/24.04.squashfs")
    )
    assert entries(cache) == [bundle.bundle_id]
    # the listing was paginated (page size 2) and followed to the end
    tokens = [entry["token"] for entry in remote.listings if entry["prefix"] == LTS_KEYS]
    assert len(tokens) > 3 and tokens[0] == "" and all(tokens[1:])


async def test_ext4_when_no_squashfs(remote: FakeRemote, cache: Path) -> None:
    fill_ci_prefix(remote, "v1.7", squashfs=False)
    bundle = await manager(remote, cache).ensure_base_image("lts")
    assert bundle.rootfs_type == "ext4"
    assert bundle.rootfs_path.name == "ubuntu-22.04.ext4"
    assert bundle.boot_args == "console=ttyS0 reboot=k panic=1 pci=off"


async def test_latest_in_the_per_release_layout(remote: FakeRemote, cache: Path) -> None:
    old_layout(remote)
    bundle = await manager(remote, cache).ensure_base_image("latest")
    # v1.16 is newer than the latest release (v1.15.1): its CI artifacts are not used
    assert bundle.bundle_id == "ci-v1.15-x86_64-vmlinux-6.1.100-ubuntu-24.04.squashfs"
    assert bundle.firecracker_version == LATEST
    assert bundle.source == "latest"
    assert bundle.kernel_path.read_bytes() == kernel_bytes("v1.15/x86_64/vmlinux-6.1.100")


async def test_latest_in_the_dated_layout_newest_first(remote: FakeRemote, cache: Path) -> None:
    new_layout(remote)
    m = manager(remote, cache)
    x86 = await m.ensure_base_image("latest")
    assert x86.bundle_id == "ci-20260301-0123456789ab-0-x86_64-vmlinux-6.1.100-ubuntu-24.04.squashfs"
    arm = await m.ensure_base_image("latest", arch="aarch64")
    assert arm.bundle_id == "ci-20260915-ba9876543210-0-aarch64-vmlinux-6.1.100-ubuntu-24.04.squashfs"
    assert arm.arch == "aarch64"
    assert arm.boot_args == "console=ttyS0 reboot=k panic=1 pci=off keep_bootcon ro rootfstype=squashfs"


def test_candidate_order() -> None:
    names = ["v1.7", "v1.16", "20260301-a-0", "v1.15", "v1.11-pcie-poc", "20260915-b-0", "v1.9", "junk"]
    assert ci_candidates(names, "v1.15.1") == ["20260915-b-0", "20260301-a-0", "v1.15", "v1.9", "v1.7"]


def test_artifact_pick_by_version_not_by_string() -> None:
    prefix = "firecracker-ci/v1.7/x86_64/"
    objs = [
        S3Object(prefix + name, 1)
        for name in ("vmlinux-6.1.99", "vmlinux-6.1.100", "vmlinux-6.1.300.debug", "ubuntu-24.04.ext4")
    ]
    kernel, rootfs = pick_ci_artifacts(objs, prefix) or (None, None)
    assert kernel is not None and kernel.key.endswith("vmlinux-6.1.100")
    assert rootfs is not None and rootfs.key.endswith("ubuntu-24.04.ext4")
    assert pick_ci_artifacts(objs[:2], prefix) is None


async def test_empty_bucket(remote: FakeRemote, cache: Path) -> None:
    remote.put_object("firecracker-ci/v1.7/x86_64/README", b"nothing here")
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache).ensure_base_image("lts")
    assert info.value.code == ErrorCode.BASE_IMAGE_RESOLVE_FAILED
    assert "firecracker-ci/{v1.7}/x86_64/" in info.value.message
    assert entries(cache) == []


@pytest.mark.parametrize("path", ["/status/404", "/status/500", "/hang"])
async def test_listing_failures_name_the_url(remote: FakeRemote, cache: Path, path: str) -> None:
    m = BaseImageManager(
        cache, ci_bucket_url=remote.url + path, release_base_url=remote.releases_url, timeout=0.3
    )
    with pytest.raises(SmartVMError) as info:
        await m.ensure_base_image("lts")
    assert info.value.code == ErrorCode.BASE_IMAGE_RESOLVE_FAILED
    assert isinstance(info.value.__cause__, SmartVMError)
    assert info.value.__cause__.code == ErrorCode.DOWNLOAD_FAILED
    assert remote.url + path in info.value.message
    assert ("timed out" if path == "/hang" else f"HTTP {path[-3:]}") in info.value.message
    assert entries(cache) == []


async def test_latest_needs_the_release_version(remote: FakeRemote, cache: Path) -> None:
    old_layout(remote)
    remote.latest = None  # /latest now 404s
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache).ensure_base_image("latest")
    assert info.value.code == ErrorCode.BASE_IMAGE_RESOLVE_FAILED
    assert "/gh/releases/latest" in info.value.message


@pytest.mark.parametrize("arg", [{"preset": "newest"}, {"arch": "riscv64"}])
async def test_bad_arguments(remote: FakeRemote, cache: Path, arg: dict[str, Any]) -> None:
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache).ensure_base_image(**arg)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, "2"])
def test_cache_limit_must_be_positive(cache: Path, limit: Any) -> None:
    with pytest.raises(SmartVMError) as info:
        BaseImageManager(cache, limit)
    assert info.value.code == ErrorCode.INVALID_BASE_IMAGE_CACHE_LIMIT


def test_accessors(cache: Path) -> None:
    m = BaseImageManager(cache, 3)
    assert m.get_cache_dir() == cache
    assert m.get_max_stored_base_images() == 3
    assert BaseImageManager().get_cache_dir() == Path("/tmp/.smartvm/base-images")
    assert BaseImageManager().get_max_stored_base_images() == 2


# --- verification and re-download --------------------------------------------------------------


async def test_cache_hit_downloads_nothing(remote: FakeRemote, cache: Path) -> None:
    fill_ci_prefix(remote, "v1.7")
    first = await manager(remote, cache).ensure_base_image("lts")
    again = await manager(remote, cache).ensure_base_image("lts")  # a new instance hashes again
    assert again == first
    assert hits(remote, LTS_KEYS + "vmlinux-6.1.100") == 1
    assert hits(remote, LTS_KEYS + "ubuntu-24.04.squashfs") == 1
    forced = await manager(remote, cache).ensure_base_image("lts", force_download=True)
    assert forced == first
    assert hits(remote, LTS_KEYS + "ubuntu-24.04.squashfs") == 2
    assert entries(cache) == [first.bundle_id]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
async def test_damaged_cache_is_downloaded_again(
    remote: FakeRemote, cache: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    fill_ci_prefix(remote, "v1.7")
    m = manager(remote, cache)
    bundle = await m.ensure_base_image("lts")
    good = bundle.rootfs_path.read_bytes()
    if damage == "flip":
        with bundle.rootfs_path.open("r+b") as fh:  # same size, one byte changed
            fh.seek(100)
            fh.write(b"X")
    elif damage == "truncate":
        bundle.rootfs_path.write_bytes(good[:-1])
    elif damage == "delete":
        bundle.rootfs_path.unlink()
    else:
        (bundle.directory / "manifest.json").write_text("{broken")
    caplog.set_level(logging.INFO, logger="smartvm.images")
    again = await m.ensure_base_image("lts")  # same instance: its hash memo must not hide the damage
    assert again.rootfs_path.read_bytes() == good
    assert hits(remote, LTS_KEYS + "ubuntu-24.04.squashfs") == 2
    if damage != "manifest":
        assert any("damaged" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert entries(cache) == [bundle.bundle_id]


async def test_size_mismatch_leaves_nothing(remote: FakeRemote, cache: Path) -> None:
    fill_ci_prefix(remote, "v1.7")
    # the listing promises more bytes than the server sends
    remote.listed_sizes[LTS_KEYS + "ubuntu-24.04.squashfs"] = 1 << 20
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache).ensure_base_image("lts")
    assert info.value.code == ErrorCode.BASE_IMAGE_PREPARE_FAILED
    assert "size mismatch" in info.value.message
    assert f"{BUCKET}/{LTS_KEYS}ubuntu-24.04.squashfs" in info.value.message
    assert entries(cache) == []


async def test_etag_md5_mismatch_leaves_nothing(remote: FakeRemote, cache: Path) -> None:
    fill_ci_prefix(remote, "v1.7")
    remote.etags[LTS_KEYS + "vmlinux-6.1.100"] = "f" * 32
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache).ensure_base_image("lts")
    assert info.value.code == ErrorCode.BASE_IMAGE_PREPARE_FAILED
    assert "md5 mismatch" in info.value.message
    assert entries(cache) == []


async def test_multipart_etag_is_not_taken_for_an_md5(remote: FakeRemote, cache: Path) -> None:
    fill_ci_prefix(remote, "v1.7")
    remote.etags[LTS_KEYS + "vmlinux-6.1.100"] = "0123456789abcdef0123456789abcdef-3"
    bundle = await manager(remote, cache).ensure_base_image("lts")
    assert bundle.kernel_path.read_bytes() == kernel_bytes("v1.7/x86_64/vmlinux-6.1.100")


# --- hosted manifests ----------------------------------------------------------------------------


async def test_hosted_manifest_url(remote: FakeRemote, cache: Path) -> None:
    url = hosted_manifest(remote)
    bundle = await manager(remote, cache).ensure_base_image("hosted", manifest_url=url)
    assert bundle.bundle_id == "hosted-1" and bundle.source == "hosted"
    assert bundle.firecracker_version == "v1.14.2"
    assert bundle.rootfs_type == "ext4"
    assert bundle.boot_args == "console=ttyS0 reboot=k panic=1 pci=off"
    assert_bundle_files(bundle, kernel_bytes("hosted"), rootfs_bytes("hosted"))
    # the constructor's manifest_url serves as the default
    again = await manager(remote, cache, manifest_url=url).ensure_base_image("hosted")
    assert again == bundle
    assert remote.hits["/hosted/files/rootfs.ext4"] == 1


def original_manifest(remote: FakeRemote, bundle_id: str = "orig-1") -> str:
    """A manifest in the original SmartVM's shape (artifacts at the top level), served over HTTP."""
    kernel, rootfs = kernel_bytes("orig"), rootfs_bytes("orig")
    remote.add("/orig/vmlinux", kernel)
    remote.add("/orig/rootfs.squashfs", rootfs)
    doc = {
        "schemaVersion": 1,
        "bundleId": bundle_id,
        "name": "original-shape bundle",
        "arch": "x86_64",
        "firecrackerVersion": "v1.15.1",
        "rootfsType": "squashfs",
        "rootfsIsReadOnly": True,
        "bootArgs": "console=ttyS0 reboot=k panic=1 pci=off ro rootfstype=squashfs custom=1",
        "kernel": {
            "url": f"{remote.url}/orig/vmlinux",
            "sha256": sha256_hex(kernel),
            "sizeBytes": len(kernel),
        },
        "rootfs": {"url": "rootfs.squashfs", "sha256": sha256_hex(rootfs), "fileName": "root_fs.squashfs"},
    }
    return remote.add(f"/orig/{bundle_id}.manifest.json", json.dumps(doc))


async def test_original_shape_manifest_gives_the_original_bundle_fields(
    remote: FakeRemote, cache: Path
) -> None:
    url = original_manifest(remote)
    before = datetime.now(UTC).replace(microsecond=0)
    bundle = await manager(remote, cache).ensure_base_image("hosted", manifest_url=url)
    kernel, rootfs = kernel_bytes("orig"), rootfs_bytes("orig")
    assert bundle.preset == "hosted" and bundle.arch == "x86_64" and bundle.ci_version is None
    assert bundle.firecracker_version == "v1.15.1" and bundle.bundle_id == "orig-1"
    assert bundle.bundle_dir == cache / "orig-1"
    assert bundle.kernel_image_path == cache / "orig-1" / "vmlinux"
    assert bundle.rootfs_path == cache / "orig-1" / "root_fs.squashfs"
    assert bundle.rootfs_type == "squashfs" and bundle.rootfs_is_read_only is True
    assert bundle.boot_args.endswith("custom=1")
    assert (bundle.kernel_sha256, bundle.rootfs_sha256) == (sha256_hex(kernel), sha256_hex(rootfs))
    assert (bundle.kernel_size_bytes, bundle.rootfs_size_bytes) == (len(kernel), len(rootfs))
    assert before <= bundle.created_at <= bundle.last_accessed_at <= datetime.now(UTC)
    # the present names still work
    assert (bundle.kernel_path, bundle.directory, bundle.source) == (
        bundle.kernel_image_path,
        bundle.bundle_dir,
        "hosted",
    )
    assert bundle.kernel_path.read_bytes() == kernel and bundle.rootfs_path.read_bytes() == rootfs
    cached = json.loads((bundle.bundle_dir / "manifest.json").read_text())
    assert cached["name"] == "original-shape bundle" and cached["rootfsIsReadOnly"] is True
    again = await manager(remote, cache).ensure_base_image("hosted", manifest_url=url)
    assert again == bundle and again.created_at == bundle.created_at
    assert again.last_accessed_at >= bundle.last_accessed_at
    assert remote.hits["/orig/rootfs.squashfs"] == 1


async def test_ci_bundles_carry_their_ci_version(remote: FakeRemote, cache: Path) -> None:
    fill_ci_prefix(remote, "v1.7")
    bundle = await manager(remote, cache).ensure_base_image("lts")
    assert bundle.preset == "lts" and bundle.ci_version == "v1.7" and bundle.rootfs_is_read_only is True
    assert bundle.rootfs_size_bytes == bundle.rootfs_path.stat().st_size
    assert bundle.kernel_sha256 == sha256_hex(bundle.kernel_path.read_bytes())
    assert manager(remote, cache).list_cached_bundles() == [bundle]


async def test_a_manifest_means_the_hosted_source_whatever_the_preset(
    remote: FakeRemote, cache: Path, tmp_path: Path
) -> None:
    fill_ci_prefix(remote, "v1.7")
    url = original_manifest(remote)
    # given to the call: hosted, although the preset says lts (and the default says latest)
    assert (await manager(remote, cache).ensure_base_image("lts", manifest_url=url)).bundle_id == "orig-1"
    assert (await manager(remote, cache).ensure_base_image(manifest_url=url)).preset == "hosted"
    # given to the manager: the same
    assert (await manager(remote, cache, manifest_url=url).ensure_base_image()).bundle_id == "orig-1"
    assert hits(remote, LTS_KEYS + "vmlinux-6.1.100") == 0
    assert not any(entry["prefix"].startswith("firecracker-ci/") for entry in remote.listings)
    # a path wins over a URL (the URL here would fail)
    path = _local_manifest(tmp_path, "vmlinux")
    dead = f"{remote.url}/status/404"
    bundle = await manager(remote, cache).ensure_base_image(manifest_url=dead, manifest_path=path)
    assert bundle.bundle_id == "local-manifest"
    by_manager = manager(remote, cache, manifest_url=dead, manifest_path=path)
    assert (await by_manager.ensure_base_image("latest")).bundle_id == "local-manifest"
    # the call's manifest comes before the manager's
    assert (await by_manager.ensure_base_image(manifest_url=url)).bundle_id == "orig-1"


async def test_hosted_checksum_mismatch_leaves_nothing(remote: FakeRemote, cache: Path) -> None:
    url = hosted_manifest(remote, rootfs={"sha256": "0" * 64})
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache).ensure_base_image("hosted", manifest_url=url)
    assert info.value.code == ErrorCode.BASE_IMAGE_PREPARE_FAILED
    assert "sha256 mismatch" in info.value.message and "/hosted/files/rootfs.ext4" in info.value.message
    assert entries(cache) == []


@pytest.mark.parametrize("status", [404, 500])
async def test_hosted_artifact_http_errors(remote: FakeRemote, cache: Path, status: int) -> None:
    url = hosted_manifest(remote, rootfs={"url": f"/status/{status}"})
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache).ensure_base_image("hosted", manifest_url=url)
    assert info.value.code == ErrorCode.BASE_IMAGE_PREPARE_FAILED
    assert f"HTTP {status}" in info.value.message and f"{remote.url}/status/{status}" in info.value.message
    assert entries(cache) == []


async def test_hosted_artifact_timeout(remote: FakeRemote, cache: Path) -> None:
    url = hosted_manifest(remote, rootfs={"url": "/hang"})
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache, timeout=0.3).ensure_base_image("hosted", manifest_url=url)
    assert info.value.code == ErrorCode.BASE_IMAGE_PREPARE_FAILED
    assert "timed out" in info.value.message and f"{remote.url}/hang" in info.value.message
    assert entries(cache) == []


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"bundleId": "../../escaped"}, "bundleId"),
        ({"bundleId": ".."}, "bundleId"),
        ({"artifacts.kernel.fileName": "../../escaped"}, "fileName"),
        ({"artifacts.kernel.fileName": "sub/vmlinux"}, "fileName"),
        ({"arch": "aarch64"}, "aarch64"),
    ],
)
async def test_hosted_manifest_traversal_and_rules(
    remote: FakeRemote, cache: Path, tmp_path: Path, change: dict[str, str], where: str
) -> None:
    url = hosted_manifest(remote)
    doc = json.loads(remote.routes[url[len(remote.url) :]].body)
    for key, value in change.items():
        *parents, last = key.split(".")
        target = doc
        for part in parents:
            target = target[part]
        target[last] = value
    remote.add(url[len(remote.url) :], json.dumps(doc))
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache).ensure_base_image("hosted", manifest_url=url)
    assert info.value.code == ErrorCode.INVALID_BASE_IMAGE_MANIFEST
    assert where in info.value.message
    assert entries(cache) == []
    # "../../escaped" lands beside tmp_path as a bundle id, inside it as a file name
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert remote.hits["/hosted/files/vmlinux"] == 0


@pytest.mark.parametrize("path", ["/status/404", "/status/500", "/hang"])
async def test_hosted_manifest_fetch_failures(remote: FakeRemote, cache: Path, path: str) -> None:
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache, timeout=0.3).ensure_base_image("hosted", manifest_url=remote.url + path)
    assert info.value.code == ErrorCode.BASE_IMAGE_MANIFEST_FAILED
    assert remote.url + path in info.value.message


async def test_hosted_needs_a_manifest(remote: FakeRemote, cache: Path) -> None:
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache).ensure_base_image("hosted")
    assert info.value.code == ErrorCode.BASE_IMAGE_MANIFEST_FAILED
    assert "manifest_url or manifest_path" in info.value.message
    assert entries(cache) == []


def _local_manifest(tmp_path: Path, kernel_path: str, **extra: Any) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "vmlinux").write_bytes(b"local kernel")
    (src / "rootfs.ext4").write_bytes(b"local rootfs")
    doc = {
        "schemaVersion": 1,
        "bundleId": "local-manifest",
        "arch": "x86_64",
        "rootfsType": "ext4",
        "bootArgs": "console=ttyS0 custom=1",
        "artifacts": {
            "kernel": {"path": kernel_path, **extra},
            "rootfs": {"path": str(src / "rootfs.ext4")},
        },
    }
    path = src / "manifest.json"
    path.write_text(json.dumps(doc))
    return path


async def test_manifest_path_with_path_artifacts(remote: FakeRemote, cache: Path, tmp_path: Path) -> None:
    path = _local_manifest(tmp_path, "vmlinux", sha256=sha256_hex(b"local kernel"))
    bundle = await manager(remote, cache).ensure_base_image("hosted", manifest_path=path)
    assert bundle.kernel_path.read_bytes() == b"local kernel"
    assert bundle.rootfs_path.read_bytes() == b"local rootfs"
    assert bundle.boot_args == "console=ttyS0 custom=1"
    assert bundle.firecracker_version is None
    assert (tmp_path / "src" / "vmlinux").read_bytes() == b"local kernel"  # the source is untouched
    # the rootfs has no declared digest: a changed source file is copied again
    (tmp_path / "src" / "rootfs.ext4").write_bytes(b"rebuilt rootfs")
    again = await manager(remote, cache).ensure_base_image("hosted", manifest_path=path)
    assert again.rootfs_path.read_bytes() == b"rebuilt rootfs"


async def test_manifest_path_escape_and_mismatch(remote: FakeRemote, cache: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"secret")
    path = _local_manifest(tmp_path, "../secret")
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache).ensure_base_image("hosted", manifest_path=path)
    assert info.value.code == ErrorCode.INVALID_BASE_IMAGE_MANIFEST
    assert entries(cache) == []
    path = _local_manifest(tmp_path, "vmlinux", sha256="0" * 64)
    with pytest.raises(SmartVMError) as info:
        await manager(remote, cache).ensure_base_image("hosted", manifest_path=path)
    assert info.value.code == ErrorCode.BASE_IMAGE_PREPARE_FAILED
    assert entries(cache) == []


async def test_republished_manifest_replaces_the_bundle(remote: FakeRemote, cache: Path) -> None:
    url = hosted_manifest(remote)
    m = manager(remote, cache)
    await m.ensure_base_image("hosted", manifest_url=url)
    remote.add("/hosted/files/rootfs-v2.ext4", b"second edition")
    hosted_manifest(
        remote,
        rootfs={"url": "files/rootfs-v2.ext4", "sha256": sha256_hex(b"second edition"), "sizeBytes": 14},
    )
    bundle = await m.ensure_base_image("hosted", manifest_url=url)
    assert bundle.rootfs_path.read_bytes() == b"second edition"
    assert entries(cache) == ["hosted-1"]
    assert sorted(p.name for p in bundle.directory.iterdir()) == [
        ".last-used",
        "manifest.json",
        "rootfs-v2.ext4",
        "vmlinux",
    ]


# --- eviction and pruning --------------------------------------------------------------------------


async def test_lru_eviction_order_and_warning(
    remote: FakeRemote, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_layout(remote)
    m = manager(remote, cache)
    lts = await m.ensure_base_image("lts")
    latest = await m.ensure_base_image("latest")
    hosted_url = hosted_manifest(remote)
    assert sorted(entries(cache)) == sorted([lts.bundle_id, latest.bundle_id])
    await m.ensure_base_image("lts")  # lts is now the most recently used
    assert [b.bundle_id for b in m.list_cached_bundles()] == [lts.bundle_id, latest.bundle_id]
    caplog.set_level(logging.WARNING, logger="smartvm.images")
    hosted = await m.ensure_base_image("hosted", manifest_url=hosted_url)
    assert entries(cache) == sorted([lts.bundle_id, hosted.bundle_id])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(latest.bundle_id in w and "evicting" in w for w in warnings)
    assert [b.bundle_id for b in m.list_cached_bundles()] == [hosted.bundle_id, lts.bundle_id]


async def test_prune_keeps_the_named_bundle(remote: FakeRemote, cache: Path) -> None:
    old_layout(remote)
    big = manager(remote, cache, limit=3)
    lts = await big.ensure_base_image("lts")
    latest = await big.ensure_base_image("latest")
    hosted = await big.ensure_base_image("hosted", manifest_url=hosted_manifest(remote))
    small = manager(remote, cache, limit=1)
    assert small.prune_base_image_cache(keep_bundle_id=lts.bundle_id) == [hosted.bundle_id, latest.bundle_id]
    assert entries(cache) == [lts.bundle_id]
    assert small.prune_base_image_cache() == []


def test_prune_sweeps_interrupted_preparations(cache: Path) -> None:
    (cache / ".tmp-some-bundle-abc123").mkdir(parents=True)
    (cache / ".tmp-some-bundle-abc123" / "vmlinux").write_bytes(b"partial")
    (cache / ".trash-old-1234").mkdir()
    (cache / "not-a-bundle").mkdir()
    assert BaseImageManager(cache).prune_base_image_cache() == []
    assert entries(cache) == ["not-a-bundle"]


async def test_offline_serves_the_cached_bundle(
    remote: FakeRemote, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill_ci_prefix(remote, "v1.7")
    bundle = await manager(remote, cache).ensure_base_image("lts")
    offline = BaseImageManager(cache, ci_bucket_url=f"{remote.url}/status/500", release_base_url=remote.url)
    caplog.set_level(logging.WARNING, logger="smartvm.images")
    assert await offline.ensure_base_image("lts") == bundle
    assert any("serving cached bundle" in r.getMessage() for r in caplog.records)
    with pytest.raises(SmartVMError) as info:  # a forced download does not fall back
        await offline.ensure_base_image("lts", force_download=True)
    assert info.value.code == ErrorCode.BASE_IMAGE_RESOLVE_FAILED
    with pytest.raises(SmartVMError) as info:  # another preset has nothing cached
        await offline.ensure_base_image("latest")
    assert info.value.code == ErrorCode.BASE_IMAGE_RESOLVE_FAILED


# --- local bundles ---------------------------------------------------------------------------------


def test_register_local_bundle(cache: Path, tmp_path: Path) -> None:
    kernel, rootfs = tmp_path / "vmlinux", tmp_path / "rootfs.ext4"
    kernel.write_bytes(b"built kernel")
    rootfs.write_bytes(b"built rootfs" * 100)
    m = BaseImageManager(cache)
    bundle = m.register_local_bundle(
        "local-busybox-abc", kernel, rootfs, "ext4", "console=ttyS0 root=/dev/vda"
    )
    assert bundle.source == "local" and bundle.firecracker_version is None
    assert bundle.directory == cache / "local-busybox-abc"
    assert_bundle_files(bundle, b"built kernel", b"built rootfs" * 100)
    assert bundle.boot_args == "console=ttyS0 root=/dev/vda"
    assert m.list_cached_bundles() == [bundle]
    manifest_mtime = (bundle.directory / "manifest.json").stat().st_mtime_ns
    assert m.register_local_bundle("local-busybox-abc", kernel, rootfs, "ext4", bundle.boot_args) == bundle
    assert (bundle.directory / "manifest.json").stat().st_mtime_ns == manifest_mtime  # reused as is
    rootfs.write_bytes(b"rebuilt rootfs" * 100)
    rebuilt = m.register_local_bundle(
        "local-busybox-abc", kernel, rootfs, "ext4", bundle.boot_args, "v1.15.1"
    )
    assert rebuilt.rootfs_path.read_bytes() == b"rebuilt rootfs" * 100
    assert rebuilt.firecracker_version == "v1.15.1"
    assert entries(cache) == ["local-busybox-abc"]


@pytest.mark.parametrize(
    ("bundle_id", "rootfs_type", "version"),
    [("../escape", "ext4", None), ("..", "ext4", None), ("ok", "xfs", None), ("ok", "ext4", "1.x")],
)
def test_register_local_bundle_validates(
    cache: Path, tmp_path: Path, bundle_id: str, rootfs_type: Any, version: str | None
) -> None:
    (tmp_path / "vmlinux").write_bytes(b"k")
    (tmp_path / "rootfs.ext4").write_bytes(b"r")
    with pytest.raises(SmartVMError) as info:
        BaseImageManager(cache).register_local_bundle(
            bundle_id, tmp_path / "vmlinux", tmp_path / "rootfs.ext4", rootfs_type, "console=ttyS0", version
        )
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert entries(cache) == []
    assert not (tmp_path / "escape").exists()


# --- concurrency -------------------------------------------------------------------------------------

_ENSURE = """
import asyncio, json, sys
from pathlib import Path
from smartvm.images.base_images import BaseImageManager

async def main() -> None:
    cache, bucket, releases = sys.argv[1:4]
    m = BaseImageManager(Path(cache), ci_bucket_url=bucket, release_base_url=releases, timeout=20)
    bundle = await m.ensure_base_image("lts")
    print(json.dumps([str(bundle.rootfs_path), bundle.rootfs_path.read_text()[:20]]))

asyncio.run(main())
"""


async def test_two_processes_ensure_once(remote: FakeRemote, cache: Path) -> None:
    fill_ci_prefix(remote, "v1.7")
    both_listed = threading.Event()

    def count_listings() -> None:
        listed = [e for e in remote.listings if e["prefix"] == LTS_KEYS and not e["token"]]
        if len(listed) >= 2:
            both_listed.set()

    def hold_first_download() -> None:
        # keep the first process downloading until the second has resolved the same bundle
        for _ in range(400):
            count_listings()
            if both_listed.is_set():
                return
            both_listed.wait(0.05)

    remote.object_hooks[LTS_KEYS + "vmlinux-6.1.100"] = hold_first_download
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _ENSURE,
            str(cache),
            remote.bucket_url,
            remote.releases_url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), timeout=120)
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()
    outputs = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in results]
    assert outputs[0] == outputs[1]
    assert both_listed.is_set()  # the two really overlapped
    assert hits(remote, LTS_KEYS + "vmlinux-6.1.100") == 1
    assert hits(remote, LTS_KEYS + "ubuntu-24.04.squashfs") == 1
    assert len(entries(cache)) == 1


async def test_concurrent_tasks_in_one_process(remote: FakeRemote, cache: Path) -> None:
    fill_ci_prefix(remote, "v1.7")
    m1, m2 = manager(remote, cache), manager(remote, cache)
    a, b = await asyncio.gather(m1.ensure_base_image("lts"), m2.ensure_base_image("lts"))
    assert a == b
    assert hits(remote, LTS_KEYS + "ubuntu-24.04.squashfs") == 1


async def test_cancelled_preparation_leaves_nothing(remote: FakeRemote, cache: Path) -> None:
    url = hosted_manifest(remote, rootfs={"url": "/hang"})
    task = asyncio.create_task(
        manager(remote, cache, timeout=30).ensure_base_image("hosted", manifest_url=url)
    )
    for _ in range(200):
        if remote.hits["/hang"]:
            break
        await asyncio.sleep(0.02)
    assert remote.hits["/hang"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert entries(cache) == []


# --- CLI -----------------------------------------------------------------------------------------------


def test_cli_pull_list_prune(remote: FakeRemote, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import typer
    from typer.testing import CliRunner

    from smartvm.cli.images import register

    old_layout(remote)
    monkeypatch.setenv("SMARTVM_CI_BUCKET_URL", remote.bucket_url)
    monkeypatch.setenv("SMARTVM_RELEASE_BASE_URL", remote.releases_url)
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """test root"""

    register(app)
    runner = CliRunner()
    pulled = runner.invoke(app, ["images", "pull", "--preset", "lts", "--cache-dir", str(cache)])
    assert pulled.exit_code == 0, pulled.output
    lts_dir = Path(pulled.stdout.strip().splitlines()[-1])
    assert lts_dir == cache / "ci-v1.7-x86_64-vmlinux-6.1.100-ubuntu-24.04.squashfs"
    assert (lts_dir / "manifest.json").is_file()
    url = hosted_manifest(remote)
    hosted = runner.invoke(app, ["images", "pull", "--manifest-url", url, "--cache-dir", str(cache)])
    assert hosted.exit_code == 0, hosted.output
    assert hosted.stdout.strip().splitlines()[-1] == str(cache / "hosted-1")
    listed = runner.invoke(
        app, ["images", "list", "--cache-dir", str(cache), "--data-dir", str(cache.parent)]
    )
    assert listed.exit_code == 0, listed.output
    assert "hosted-1" in listed.stdout and lts_dir.name in listed.stdout
    assert listed.stdout.index("hosted-1") < listed.stdout.index(lts_dir.name)  # most recent first
    pruned = runner.invoke(app, ["images", "prune", "--max-stored", "1", "--cache-dir", str(cache)])
    assert pruned.exit_code == 0, pruned.output
    assert pruned.stdout.split() == [lts_dir.name]
    failed = runner.invoke(
        app, ["images", "pull", "--manifest-url", f"{remote.url}/status/404", "--cache-dir", str(cache)]
    )
    assert isinstance(failed.exception, SmartVMError)
    assert failed.exception.code == ErrorCode.BASE_IMAGE_MANIFEST_FAILED


# --- S3 listing --------------------------------------------------------------------------------------


async def test_listing_pages_and_prefixes(remote: FakeRemote) -> None:
    new_layout(remote)
    async with http_client(2) as client:
        top = await list_objects(remote.bucket_url, "firecracker-ci/", client=client, delimiter="/")
        full = await list_objects(remote.bucket_url, "firecracker-ci/v1.7/", client=client)
    assert top.objects == []
    assert top.prefixes == [
        "firecracker-ci/20260301-0123456789ab-0/",
        "firecracker-ci/20260915-ba9876543210-0/",
        "firecracker-ci/v1.15/",
        "firecracker-ci/v1.7/",
    ]
    assert sorted(o.key for o in full.objects) == sorted(
        k for k in remote.objects if k.startswith("firecracker-ci/v1.7/")
    )
    assert len({o.key for o in full.objects}) == len(full.objects)  # no page served twice
    assert all(o.etag and len(o.etag) == 32 for o in full.objects)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><ListBucketResult/>", "DOCTYPE"),
        ("<ListBucketResult><Contents>", "not valid XML"),
        ("<Error><Code>AccessDenied</Code></Error>", "not an S3 ListBucketResult"),
        ("<ListBucketResult><Contents><Key>k</Key></Contents></ListBucketResult>", "without Key or Size"),
        ("<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>", "continuation token"),
    ],
)
async def test_broken_listings(remote: FakeRemote, body: str, reason: str) -> None:
    remote.add("/broken/", body)
    async with http_client(2) as client:
        with pytest.raises(SmartVMError) as info:
            await list_objects(remote.url + "/broken", "", client=client)
    assert info.value.code == ErrorCode.DOWNLOAD_FAILED
    assert reason in info.value.message
