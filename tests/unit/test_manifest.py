"""Hosted manifest schema 1: every validation rule, camelCase on disk, fetching and reading."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from http_fixtures import FakeRemote, serving

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.download import http_client
from smartvm.images.manifest import (
    default_boot_args,
    fetch_manifest,
    parse_manifest,
    read_manifest,
    resolve_artifact_path,
    resolve_artifact_url,
)

SHA = "a" * 64


def valid() -> dict[str, Any]:
    return {
        "schemaVersion": 1,
        "bundleId": "ubuntu-24.04_fc.1",
        "arch": "x86_64",
        "firecrackerVersion": "v1.15.1",
        "rootfsType": "squashfs",
        "artifacts": {
            "kernel": {"url": "https://example.test/k/vmlinux-6.1.155", "sha256": SHA, "sizeBytes": 10},
            "rootfs": {"url": "rootfs/ubuntu.squashfs", "sha256": "B" * 64, "fileName": "rootfs.squashfs"},
        },
    }


def with_change(path: str, value: Any) -> dict[str, Any]:
    """A valid manifest with one key changed (``value=...`` Ellipsis deletes it)."""
    doc = copy.deepcopy(valid())
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return doc


def invalid(doc: dict[str, Any] | str, *, arch: str | None = "x86_64") -> str:
    with pytest.raises(SmartVMError) as info:
        parse_manifest(doc, where="test.json", arch=arch)
    assert info.value.code == ErrorCode.INVALID_BASE_IMAGE_MANIFEST
    assert "test.json" in info.value.message
    return info.value.message


@pytest.fixture
def remote() -> Iterator[FakeRemote]:
    with serving() as server:
        yield server


def test_valid_manifest_parses() -> None:
    m = parse_manifest(json.dumps(valid()), where="test.json", arch="x86_64")
    assert m.bundle_id == "ubuntu-24.04_fc.1"
    assert m.firecracker_version == "v1.15.1"
    assert m.rootfs_type == "squashfs"
    assert m.artifacts.kernel.name == "vmlinux-6.1.155"  # derived from the URL
    assert m.artifacts.rootfs.name == "rootfs.squashfs"
    assert m.artifacts.rootfs.sha256 == "b" * 64  # normalised to lower case
    assert m.effective_boot_args() == "console=ttyS0 reboot=k panic=1 pci=off ro rootfstype=squashfs"


def test_on_disk_form_keeps_camel_case() -> None:
    m = parse_manifest(valid(), where="test.json")
    doc = json.loads(m.to_json())
    assert {"schemaVersion", "bundleId", "firecrackerVersion", "rootfsType", "artifacts"} <= doc.keys()
    assert doc["artifacts"]["kernel"]["sizeBytes"] == 10
    assert doc["artifacts"]["kernel"]["fileName"] == "vmlinux-6.1.155"
    assert "boot_args" not in doc and "bootArgs" not in doc  # unset fields left out
    assert parse_manifest(m.to_json(), where="again") == m


def test_optional_fields() -> None:
    doc = with_change("firecrackerVersion", ...)
    doc["bootArgs"] = "console=ttyS0 custom=1"
    m = parse_manifest(doc, where="test.json", arch="x86_64")
    assert m.firecracker_version is None
    assert m.effective_boot_args() == "console=ttyS0 custom=1"
    assert (
        parse_manifest(with_change("artifacts.kernel.sizeBytes", 0), where="t").artifacts.kernel.size_bytes
        == 0
    )


@pytest.mark.parametrize("value", [2, 0, "1", True, 1.0, None])
def test_schema_version_must_be_1(value: Any) -> None:
    assert "schemaVersion" in invalid(with_change("schemaVersion", value))


def test_schema_version_is_required() -> None:
    assert "schemaVersion" in invalid(with_change("schemaVersion", ...))


@pytest.mark.parametrize("value", ["", "..", ".", "a/b", "../etc", "with space", "ü", "x" * 129, "a\\b", 7])
def test_bundle_id_rule(value: Any) -> None:
    assert "bundleId" in invalid(with_change("bundleId", value))


def test_arch_must_equal_the_requested_arch() -> None:
    message = invalid(with_change("arch", "aarch64"), arch="x86_64")
    assert "aarch64" in message and "x86_64" in message
    assert parse_manifest(with_change("arch", "aarch64"), where="t", arch="aarch64").arch == "aarch64"


@pytest.mark.parametrize("value", ["1.15.1", "v1.15", "v1.15.1-rc1", "latest", "v1.x.1", 115])
def test_firecracker_version_rule(value: Any) -> None:
    assert "firecrackerVersion" in invalid(with_change("firecrackerVersion", value))


@pytest.mark.parametrize("value", ["xfs", "EXT4", "", None])
def test_rootfs_type_rule(value: Any) -> None:
    assert "rootfsType" in invalid(with_change("rootfsType", value))


def test_exactly_one_of_url_and_path() -> None:
    both = with_change("artifacts.kernel.path", "/srv/vmlinux")
    assert "exactly one of 'url' or 'path'" in invalid(both)
    neither = with_change("artifacts.kernel.url", ...)
    assert "exactly one of 'url' or 'path'" in invalid(neither)
    path_only = with_change("artifacts.kernel.url", ...)
    path_only["artifacts"]["kernel"]["path"] = "vmlinux"
    del path_only["artifacts"]["kernel"]["sha256"]  # a path needs no digest
    assert parse_manifest(path_only, where="t").artifacts.kernel.path == "vmlinux"


def test_url_requires_sha256() -> None:
    assert "needs a 'sha256'" in invalid(with_change("artifacts.kernel.sha256", ...))


@pytest.mark.parametrize("value", ["a" * 63, "a" * 65, "g" * 64, "", 123])
def test_sha256_must_be_64_hex(value: Any) -> None:
    assert "sha256" in invalid(with_change("artifacts.kernel.sha256", value))


@pytest.mark.parametrize("value", [-1, 1.5, "10", True, [1]])
def test_size_bytes_must_be_a_non_negative_integer(value: Any) -> None:
    assert "sizeBytes" in invalid(with_change("artifacts.kernel.sizeBytes", value))


@pytest.mark.parametrize(
    "value",
    [
        "../vmlinux",
        "a/b",
        "..",
        ".",
        ".hidden",
        "",
        "manifest.json",
        "/etc/passwd",
        "a\\b",
        "x\x00y",
        "vm linux",
        "vmlinux+6.1",
        "rootfs:1",
        "ümlaut",
        "a" * 256,
    ],
)
def test_file_name_must_be_a_plain_name(value: str) -> None:
    assert "fileName" in invalid(with_change("artifacts.kernel.fileName", value))


def test_file_name_cannot_be_derived_from_a_bare_host_url() -> None:
    assert "fileName" in invalid(with_change("artifacts.kernel.url", "https://example.test/"))


def test_kernel_and_rootfs_need_distinct_names() -> None:
    assert "share the fileName" in invalid(with_change("artifacts.kernel.fileName", "rootfs.squashfs"))


@pytest.mark.parametrize("value", ["file:///etc/passwd", "ftp://example.test/k", ""])
def test_url_scheme_rule(value: str) -> None:
    assert "url" in invalid(with_change("artifacts.kernel.url", value))


def test_unknown_and_missing_keys() -> None:
    assert "sha256sum" in invalid(with_change("artifacts.kernel.sha256sum", SHA))
    assert "extra" in invalid(with_change("extra", 1))
    assert "artifacts.rootfs" in invalid(with_change("artifacts.rootfs", ...))
    assert "bundleId" in invalid(with_change("bundleId", ...))


def test_not_json_or_not_an_object() -> None:
    assert "not valid JSON" in invalid("{not json")
    assert "JSON object" in invalid("[1, 2]")


def test_default_boot_args() -> None:
    assert default_boot_args("x86_64", "ext4") == "console=ttyS0 reboot=k panic=1 pci=off"
    assert default_boot_args("aarch64", "ext4") == "console=ttyS0 reboot=k panic=1 pci=off keep_bootcon"
    assert default_boot_args("aarch64", "squashfs").endswith("keep_bootcon ro rootfstype=squashfs")


def test_relative_urls_resolve_against_the_manifest() -> None:
    m = parse_manifest(valid(), where="t")
    base = "http://mirror.test/bundles/v1/manifest.json"
    assert (
        resolve_artifact_url(m.artifacts.rootfs, base)
        == "http://mirror.test/bundles/v1/rootfs/ubuntu.squashfs"
    )
    assert resolve_artifact_url(m.artifacts.kernel, base) == "https://example.test/k/vmlinux-6.1.155"


def test_relative_paths_stay_inside_the_manifest_directory(tmp_path: Path) -> None:
    doc = with_change("artifacts.kernel.url", ...)
    doc["artifacts"]["kernel"]["path"] = "../outside/vmlinux"
    m = parse_manifest(doc, where="t")
    with pytest.raises(SmartVMError) as info:
        resolve_artifact_path(m.artifacts.kernel, tmp_path, where="t")
    assert info.value.code == ErrorCode.INVALID_BASE_IMAGE_MANIFEST
    doc["artifacts"]["kernel"]["path"] = "sub/../vmlinux"
    m = parse_manifest(doc, where="t")
    assert resolve_artifact_path(m.artifacts.kernel, tmp_path, where="t") == tmp_path / "vmlinux"
    doc["artifacts"]["kernel"]["path"] = "/srv/images/vmlinux"
    m = parse_manifest(doc, where="t")
    assert resolve_artifact_path(m.artifacts.kernel, tmp_path, where="t") == Path("/srv/images/vmlinux")


async def test_fetch_manifest(remote: FakeRemote) -> None:
    url = remote.add("/m/manifest.json", json.dumps(valid()))
    async with http_client(2) as client:
        m = await fetch_manifest(url, client=client, arch="x86_64")
    assert m.bundle_id == "ubuntu-24.04_fc.1"


@pytest.mark.parametrize("path", ["/status/404", "/status/500", "/hang"])
async def test_fetch_manifest_failures(remote: FakeRemote, path: str) -> None:
    async with http_client(0.3) as client:
        with pytest.raises(SmartVMError) as info:
            await fetch_manifest(remote.url + path, client=client, arch="x86_64")
    assert info.value.code == ErrorCode.BASE_IMAGE_MANIFEST_FAILED
    assert remote.url + path in info.value.message


async def test_hosted_manifest_cannot_use_paths(remote: FakeRemote) -> None:
    doc = with_change("artifacts.kernel.url", ...)
    doc["artifacts"]["kernel"]["path"] = "/etc/shadow"
    url = remote.add("/m/manifest.json", json.dumps(doc))
    async with http_client(2) as client:
        with pytest.raises(SmartVMError) as info:
            await fetch_manifest(url, client=client, arch="x86_64")
    assert info.value.code == ErrorCode.INVALID_BASE_IMAGE_MANIFEST
    assert "'path'" in info.value.message


async def test_invalid_hosted_manifest(remote: FakeRemote) -> None:
    url = remote.add("/m/manifest.json", json.dumps(with_change("bundleId", "../../escape")))
    async with http_client(2) as client:
        with pytest.raises(SmartVMError) as info:
            await fetch_manifest(url, client=client, arch="x86_64")
    assert info.value.code == ErrorCode.INVALID_BASE_IMAGE_MANIFEST


def test_read_manifest(tmp_path: Path) -> None:
    with pytest.raises(SmartVMError) as info:
        read_manifest(tmp_path / "missing.json", arch="x86_64")
    assert info.value.code == ErrorCode.BASE_IMAGE_MANIFEST_FAILED
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(valid()))
    with pytest.raises(SmartVMError) as info:
        read_manifest(path, arch="x86_64")  # the rootfs URL is relative: no base to resolve it
    assert info.value.code == ErrorCode.INVALID_BASE_IMAGE_MANIFEST
    path.write_text(json.dumps(with_change("artifacts.rootfs.url", "https://example.test/r.squashfs")))
    assert read_manifest(path, arch="x86_64").artifacts.rootfs.name == "rootfs.squashfs"


# --- the original SmartVM's shape ----------------------------------------------------------------


def original() -> dict[str, Any]:
    """A manifest as the original SmartVM documents it: artifacts at the top level."""
    return {
        "schemaVersion": 1,
        "bundleId": "smartvm-minimal-v1-x86_64",
        "name": "SmartVM minimal x86_64 bundle",
        "arch": "x86_64",
        "firecrackerVersion": "v1.15.1",
        "rootfsType": "ext4",
        "rootfsIsReadOnly": True,
        "bootArgs": "console=ttyS0 reboot=k panic=1 pci=off",
        "kernel": {"url": "https://example.test/vmlinux", "sha256": SHA, "sizeBytes": 10},
        "rootfs": {"url": "https://example.test/rootfs.ext4", "sha256": SHA, "fileName": "root_fs-1.ext4"},
    }


def test_the_original_shape_is_accepted_as_it_is() -> None:
    m = parse_manifest(json.dumps(original()), where="test.json", arch="x86_64")
    assert m.bundle_id == "smartvm-minimal-v1-x86_64" and m.name == "SmartVM minimal x86_64 bundle"
    assert m.artifacts.kernel.name == "vmlinux" and m.artifacts.kernel.size_bytes == 10
    assert m.artifacts.rootfs.name == "root_fs-1.ext4"
    assert m.rootfs_type == "ext4" and m.rootfs_is_read_only is True and m.read_only_rootfs
    assert m.effective_boot_args() == "console=ttyS0 reboot=k panic=1 pci=off"
    # written back in smartvm's own shape, and read again to the same manifest
    doc = json.loads(m.to_json())
    assert "kernel" not in doc and doc["artifacts"]["rootfs"]["fileName"] == "root_fs-1.ext4"
    assert doc["rootfsIsReadOnly"] is True and doc["name"] == m.name
    assert parse_manifest(m.to_json(), where="again") == m


def test_the_original_shape_needs_firecracker_version_and_both_artifacts() -> None:
    doc = original()
    del doc["firecrackerVersion"]
    assert "firecrackerVersion is required" in invalid(doc)
    doc = original()
    del doc["rootfs"]
    assert "rootfs" in invalid(doc)
    doc = original()
    doc["artifacts"] = valid()["artifacts"]
    assert "either as top-level kernel/rootfs or under artifacts" in invalid(doc)
    doc = original()
    doc["kernel"]["fileName"] = "vmlinux+6.1"
    assert "fileName" in invalid(doc)
    doc = original()
    doc["name"] = "two\nlines"
    assert "name" in invalid(doc)


@pytest.mark.parametrize(
    ("rootfs", "rootfs_type", "read_only"),
    [
        ({"url": "https://example.test/ubuntu.squashfs", "sha256": SHA}, "squashfs", True),
        ({"url": "https://example.test/x", "sha256": SHA, "fileName": "r.SQUASHFS"}, "squashfs", True),
        ({"path": "images/rootfs.ext4"}, "ext4", False),
        ({"path": "images/rootfs.img"}, "ext4", False),
    ],
)
def test_rootfs_type_and_read_only_default_from_the_rootfs(
    rootfs: dict[str, Any], rootfs_type: str, read_only: bool
) -> None:
    doc = original()
    del doc["rootfsType"], doc["rootfsIsReadOnly"]
    doc["rootfs"] = rootfs
    m = parse_manifest(doc, where="t")
    assert (m.rootfs_type, m.rootfs_is_read_only, m.read_only_rootfs) == (rootfs_type, None, read_only)
