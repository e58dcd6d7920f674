"""ImageManager: Firecracker releases from a GitHub-like loopback server, loose artifacts, rootfs helpers."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from http_fixtures import RELEASES, FakeRemote, make_tar, serving, sha256_hex

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.storage import allocated_bytes
from smartvm.images.releases import (
    CI_BUCKET_ENV,
    DEFAULT_CI_BUCKET_URL,
    DEFAULT_RELEASE_BASE_URL,
    RELEASE_BASE_ENV,
    ImageManager,
)

VERSION = "v1.15.1"


@pytest.fixture
def remote() -> Iterator[FakeRemote]:
    with serving() as server:
        yield server


@pytest.fixture
def manager(remote: FakeRemote, tmp_path: Path) -> ImageManager:
    return ImageManager(tmp_path / "data", release_base_url=remote.releases_url, timeout=2)


def _named(root: Path, name: str) -> list[Path]:
    return list(root.rglob(name))


def _bin_entries(manager: ImageManager) -> list[str]:
    return sorted(p.name for p in manager.bin_dir.iterdir()) if manager.bin_dir.exists() else []


async def _install_fails(manager: ImageManager, version: str = VERSION) -> SmartVMError:
    """``download_firecracker`` raises and leaves nothing in ``bin/`` (no staging, no half install)."""
    with pytest.raises(SmartVMError) as info:
        await manager.download_firecracker(version)
    assert _bin_entries(manager) == []
    return info.value


async def test_latest_version_follows_the_redirect(remote: FakeRemote, manager: ImageManager) -> None:
    remote.latest = VERSION
    assert await manager.get_latest_version() == VERSION
    assert remote.hits[f"{RELEASES}/tag/{VERSION}"] == 1


async def test_latest_version_without_redirect_fails(remote: FakeRemote, manager: ImageManager) -> None:
    remote.add(f"{RELEASES}/latest", "<html>no redirect</html>")
    with pytest.raises(SmartVMError) as info:
        await manager.get_latest_version()
    assert info.value.code == ErrorCode.VERSION_FETCH_FAILED
    assert f"{remote.releases_url}/latest" in info.value.message


@pytest.mark.parametrize("base", ["/status/404", "/status/500", "/hang"])
async def test_latest_version_http_failures(remote: FakeRemote, tmp_path: Path, base: str) -> None:
    manager = ImageManager(tmp_path, release_base_url=remote.url + base, timeout=0.3)
    with pytest.raises(SmartVMError) as info:
        await manager.get_latest_version()
    assert info.value.code == ErrorCode.VERSION_FETCH_FAILED
    assert remote.url + base in info.value.message


async def test_download_firecracker_installs_both_binaries(remote: FakeRemote, manager: ImageManager) -> None:
    binaries = remote.add_release(VERSION)
    assert not manager.has_binary(VERSION)
    path = await manager.download_firecracker(VERSION)
    assert path == manager.get_firecracker_path(VERSION) == manager.data_dir / "bin" / VERSION / "firecracker"
    assert manager.get_jailer_path(VERSION) == manager.data_dir / "bin" / VERSION / "jailer"
    assert path.read_bytes() == binaries["firecracker"]
    assert manager.get_jailer_path(VERSION).read_bytes() == binaries["jailer"]
    assert os.access(path, os.X_OK) and os.access(manager.get_jailer_path(VERSION), os.X_OK)
    assert manager.has_binary(VERSION)
    assert _bin_entries(manager) == [VERSION]  # staging cleaned up
    assert sorted(p.name for p in (manager.bin_dir / VERSION).iterdir()) == ["firecracker", "jailer"]
    assert manager.list_versions() == [VERSION]
    # a second call uses what is installed
    tgz = f"{RELEASES}/download/{VERSION}/firecracker-{VERSION}-x86_64.tgz"
    assert remote.hits[tgz] == 1
    await manager.download_firecracker("1.15.1")
    assert remote.hits[tgz] == 1


async def test_download_firecracker_for_aarch64(remote: FakeRemote, tmp_path: Path) -> None:
    remote.add_release(VERSION, "aarch64")
    manager = ImageManager(tmp_path, arch="aarch64", release_base_url=remote.releases_url)
    await manager.download_firecracker(VERSION)
    assert manager.has_binary(VERSION)


async def test_checksum_mismatch_leaves_nothing(remote: FakeRemote, manager: ImageManager) -> None:
    remote.add_release(VERSION, sha_override="ab" * 32)
    err = await _install_fails(manager)
    assert err.code == ErrorCode.DOWNLOAD_FAILED
    assert f"firecracker-{VERSION}-x86_64.tgz" in err.message
    assert "sha256 mismatch" in err.message
    assert not manager.has_binary(VERSION)


async def test_missing_published_checksum_is_refused(remote: FakeRemote, manager: ImageManager) -> None:
    remote.add_release(VERSION, publish_sha=False)
    err = await _install_fails(manager)
    assert err.code == ErrorCode.DOWNLOAD_FAILED
    assert "publishes no checksum" in err.message and "--insecure-no-checksum" in err.message
    assert not manager.has_binary(VERSION)
    assert remote.hits[f"{RELEASES}/download/{VERSION}/firecracker-{VERSION}-x86_64.tgz"] <= 1


async def test_missing_published_checksum_with_explicit_opt_out(remote: FakeRemote, tmp_path: Path) -> None:
    remote.add_release(VERSION, publish_sha=False)
    manager = ImageManager(
        tmp_path / "data", release_base_url=remote.releases_url, timeout=2, allow_unverified=True
    )
    await manager.download_firecracker(VERSION)
    assert manager.has_binary(VERSION)


def _link_member(kind: bytes, linkname: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(f"release-{VERSION}-x86_64/firecracker-{VERSION}-x86_64")
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    "member",
    [
        _link_member(tarfile.SYMTYPE, "jailer-v1.15.1-x86_64"),  # inside the tarball, still refused
        _link_member(tarfile.LNKTYPE, f"release-{VERSION}-x86_64/jailer-{VERSION}-x86_64"),
    ],
    ids=["symlink", "hardlink"],
)
async def test_release_with_a_link_member_is_refused(
    remote: FakeRemote, manager: ImageManager, member: tarfile.TarInfo
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        jailer = tarfile.TarInfo(f"release-{VERSION}-x86_64/jailer-{VERSION}-x86_64")
        jailer.size, jailer.mode = 10, 0o755
        tar.addfile(jailer, io.BytesIO(b"#!/bin/sh\n"))
        tar.addfile(member)
    remote.add_release(VERSION, tarball=buf.getvalue())
    err = await _install_fails(manager)
    assert err.code == ErrorCode.UNSAFE_PATH
    assert f"firecracker-{VERSION}-x86_64" in err.message and "link" in err.message
    assert not manager.has_binary(VERSION)


async def test_checksum_file_server_error_fails(remote: FakeRemote, manager: ImageManager) -> None:
    remote.add_release(VERSION)
    name = f"firecracker-{VERSION}-x86_64.tgz"
    remote.add(f"{RELEASES}/download/{VERSION}/{name}.sha256.txt", "oops", 500)
    err = await _install_fails(manager)
    assert err.code == ErrorCode.DOWNLOAD_FAILED
    assert "HTTP 500" in err.message


async def test_missing_release_is_a_404(remote: FakeRemote, manager: ImageManager) -> None:
    err = await _install_fails(manager, "v9.9.9")
    assert err.code == ErrorCode.DOWNLOAD_FAILED
    assert "HTTP 404" in err.message
    assert f"{remote.releases_url}/download/v9.9.9/firecracker-v9.9.9-x86_64.tgz" in err.message


async def test_tarball_with_traversal_is_refused(
    remote: FakeRemote, manager: ImageManager, tmp_path: Path
) -> None:
    release_dir = f"release-{VERSION}-x86_64"
    remote.add_release(
        VERSION,
        members={
            f"{release_dir}/firecracker-{VERSION}-x86_64": b"fc",
            f"{release_dir}/jailer-{VERSION}-x86_64": b"jailer",
            f"{release_dir}/../../../../escaped": b"evil",
        },
    )
    err = await _install_fails(manager)
    assert err.code == ErrorCode.UNSAFE_PATH
    assert _named(tmp_path, "escaped") == []


async def test_tarball_without_jailer_fails(remote: FakeRemote, manager: ImageManager) -> None:
    remote.add_release(VERSION, members={f"release-{VERSION}-x86_64/firecracker-{VERSION}-x86_64": b"fc"})
    err = await _install_fails(manager)
    assert err.code == ErrorCode.DOWNLOAD_FAILED
    assert "jailer" in err.message


async def test_damaged_tarball_fails(remote: FakeRemote, manager: ImageManager) -> None:
    remote.add_release(VERSION, tarball=make_tar({"x": b"y" * 4096})[:50])
    err = await _install_fails(manager)
    assert err.code == ErrorCode.DOWNLOAD_FAILED


@pytest.mark.parametrize("version", ["../../etc", "v1.2", "latest", "v1.2.3/../../x", ""])
async def test_bad_versions_never_reach_a_path(manager: ImageManager, version: str) -> None:
    with pytest.raises(SmartVMError) as info:
        await manager.download_firecracker(version)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    with raises_code(ErrorCode.INVALID_ARGUMENT):
        manager.get_firecracker_path(version)


def test_base_urls_option_env_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(RELEASE_BASE_ENV, raising=False)
    monkeypatch.delenv(CI_BUCKET_ENV, raising=False)
    plain = ImageManager(tmp_path)
    assert plain.release_base_url == DEFAULT_RELEASE_BASE_URL
    assert plain.ci_bucket_url == DEFAULT_CI_BUCKET_URL
    monkeypatch.setenv(RELEASE_BASE_ENV, "http://mirror.test/releases/")
    monkeypatch.setenv(CI_BUCKET_ENV, "http://mirror.test/bucket")
    from_env = ImageManager(tmp_path)
    assert from_env.release_base_url == "http://mirror.test/releases"
    assert from_env.ci_bucket_url == "http://mirror.test/bucket"
    explicit = ImageManager(tmp_path, release_base_url="http://a.test/r", ci_bucket_url="http://a.test/b")
    assert (explicit.release_base_url, explicit.ci_bucket_url) == ("http://a.test/r", "http://a.test/b")


def test_unknown_arch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SmartVMError) as info:
        ImageManager(tmp_path, arch="riscv64")
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


# --- loose artifacts -----------------------------------------------------------------------


async def test_download_kernel_and_rootfs(remote: FakeRemote, manager: ImageManager) -> None:
    kernel = remote.add("/k/vmlinux", b"kernel" * 100)
    rootfs = remote.add("/r/rootfs.ext4", b"rootfs" * 100)
    k = await manager.download_kernel(kernel, "vmlinux-test", sha256=sha256_hex(b"kernel" * 100))
    r = await manager.download_rootfs(rootfs, "base.ext4", size=600)
    assert k == manager.data_dir / "kernels" / "vmlinux-test" and k.read_bytes() == b"kernel" * 100
    assert r == manager.data_dir / "rootfs" / "base.ext4" and r.read_bytes() == b"rootfs" * 100


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "/etc/passwd"])
async def test_artifact_names_cannot_escape(remote: FakeRemote, manager: ImageManager, name: str) -> None:
    url = remote.add("/k/vmlinux", b"kernel")
    for call in (manager.download_kernel, manager.download_rootfs):
        with pytest.raises(SmartVMError) as info:
            await call(url, name)
        assert info.value.code == ErrorCode.UNSAFE_PATH
    with pytest.raises(SmartVMError) as info:
        await manager.create_blank_rootfs(name, 8)
    assert info.value.code == ErrorCode.UNSAFE_PATH
    assert remote.hits["/k/vmlinux"] == 0


async def test_kernel_download_404(remote: FakeRemote, manager: ImageManager) -> None:
    with pytest.raises(SmartVMError) as info:
        await manager.download_kernel(f"{remote.url}/status/404", "vmlinux")
    assert info.value.code == ErrorCode.DOWNLOAD_FAILED
    assert not (manager.kernels_dir / "vmlinux").exists()
    assert list(manager.kernels_dir.iterdir()) == []


async def test_create_blank_rootfs_is_sparse_ext4(manager: ImageManager) -> None:
    path = await manager.create_blank_rootfs("scratch.ext4", 64)
    assert path == manager.rootfs_dir / "scratch.ext4"
    assert path.stat().st_size == 64 << 20
    with path.open("rb") as fh:
        fh.seek(1024 + 56)
        assert fh.read(2) == b"\x53\xef"  # ext2/3/4 superblock magic
    assert allocated_bytes(path) < 32 << 20
    assert sorted(p.name for p in manager.rootfs_dir.iterdir()) == ["scratch.ext4"]
    with pytest.raises(SmartVMError) as info:
        await manager.create_blank_rootfs("scratch.ext4", 64)
    assert info.value.code == ErrorCode.ROOTFS_CREATE_FAILED


@pytest.mark.parametrize("size", [0, -1, True])
async def test_create_blank_rootfs_needs_a_positive_size(manager: ImageManager, size: int) -> None:
    with pytest.raises(SmartVMError) as info:
        await manager.create_blank_rootfs("x.ext4", size)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


async def test_clone_rootfs(manager: ImageManager, tmp_path: Path) -> None:
    source = tmp_path / "source.ext4"
    source.write_bytes(b"S" * 10000)
    clone = await manager.clone_rootfs(source, "copy.ext4")
    assert clone.read_bytes() == source.read_bytes()
    clone.write_bytes(b"changed")
    assert source.read_bytes() == b"S" * 10000
    assert sorted(p.name for p in manager.rootfs_dir.iterdir()) == ["copy.ext4"]
    with pytest.raises(SmartVMError) as info:
        await manager.clone_rootfs(source, "copy.ext4")
    assert info.value.code == ErrorCode.ROOTFS_CLONE_FAILED
    with pytest.raises(SmartVMError) as info:
        await manager.clone_rootfs(tmp_path / "missing.ext4", "other.ext4")
    assert info.value.code == ErrorCode.ROOTFS_CLONE_FAILED
    assert sorted(p.name for p in manager.rootfs_dir.iterdir()) == ["copy.ext4"]


def _images_app() -> Any:
    """A typer app with just the ``images`` commands, as the CLI registers them."""
    import typer

    from smartvm.cli.images import register

    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """test root"""

    register(app)
    return app


def test_cli_installs_the_latest_firecracker_and_reuses_it(
    remote: FakeRemote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    binaries = remote.add_release(VERSION)
    remote.latest = VERSION
    monkeypatch.setenv(RELEASE_BASE_ENV, remote.releases_url)
    app = _images_app()
    runner = CliRunner()
    data = tmp_path / "data"
    first = runner.invoke(app, ["images", "firecracker", "--data-dir", str(data)])
    assert first.exit_code == 0, first.output
    binary = Path(first.stdout.strip().splitlines()[-1])
    assert binary == data / "bin" / VERSION / "firecracker" and binary.read_bytes() == binaries["firecracker"]
    assert os.access(binary, os.X_OK) and (binary.parent / "jailer").read_bytes() == binaries["jailer"]
    downloads = dict(remote.hits)
    assert any("download" in k for k in downloads)
    again = runner.invoke(app, ["images", "firecracker", "--version", VERSION[1:], "--data-dir", str(data)])
    assert again.exit_code == 0, again.output
    assert again.stdout.strip().splitlines()[-1] == str(binary)
    assert {k: v for k, v in remote.hits.items() if "download" in k} == {
        k: v for k, v in downloads.items() if "download" in k
    }  # reused, nothing downloaded again


def test_cli_installs_an_unverified_release_only_when_told(
    remote: FakeRemote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    remote.add_release(VERSION, publish_sha=False)
    monkeypatch.setenv(RELEASE_BASE_ENV, remote.releases_url)
    app = _images_app()
    runner = CliRunner()
    data = tmp_path / "data"
    args = ["images", "firecracker", "--version", VERSION, "--data-dir", str(data)]
    refused = runner.invoke(app, args)
    assert isinstance(refused.exception, SmartVMError), refused.output
    assert "publishes no checksum" in refused.exception.message
    assert not (data / "bin" / VERSION).exists()
    allowed = runner.invoke(app, [*args, "--insecure-no-checksum"])
    assert allowed.exit_code == 0, allowed.output
    assert Path(allowed.stdout.strip().splitlines()[-1]) == data / "bin" / VERSION / "firecracker"


# --- the original's constructor and directories ------------------------------------------------


def test_arch_is_the_second_positional_argument(tmp_path: Path) -> None:
    manager = ImageManager(tmp_path / "data", "aarch64")
    assert manager.arch == "aarch64" and manager.data_dir == tmp_path / "data"


def test_ensure_directories_makes_private_dirs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    manager = ImageManager(data)
    manager.ensure_directories()
    manager.ensure_directories()  # idempotent
    for sub in ("bin", "kernels", "rootfs"):
        assert (data / sub).is_dir() and (data / sub).stat().st_mode & 0o777 == 0o700
    assert data.stat().st_mode & 0o777 == 0o700


def test_a_data_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "bin" / "v1.15.1").mkdir(parents=True)
    for name in ("firecracker", "jailer"):
        binary = data / "bin" / "v1.15.1" / name
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    for d in (data, data / "bin", data / "bin" / "v1.15.1"):
        d.chmod(0o700)
    manager = ImageManager(data)
    assert manager.has_binary("v1.15.1")
    data.chmod(0o777)  # anyone could have swapped the binaries
    for call in (manager.ensure_directories, lambda: manager.has_binary("v1.15.1")):
        with pytest.raises(SmartVMError) as info:
            call()
        assert info.value.code == ErrorCode.UNSAFE_DIRECTORY and str(data) in info.value.message
    data.chmod(0o700)
    (data / "bin" / "v1.15.1" / "jailer").chmod(0o777)
    with pytest.raises(SmartVMError) as info:
        manager.has_binary("v1.15.1")
    assert info.value.code == ErrorCode.UNSAFE_DIRECTORY and "jailer" in info.value.message
