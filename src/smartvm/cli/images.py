"""``smartvm images``: list, pull and prune base image bundles, install Firecracker, build guests.

``pull`` prints the bundle directory as the last line on stdout, so scripts can
``dir=$(smartvm images pull | tail -n1)``; everything else it says goes to stderr.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import typer
from rich.console import Console
from rich.table import Table

from smartvm.cli.images_build import add_build_commands
from smartvm.images.base_images import DEFAULT_CACHE_DIR, BaseImageBundle, BaseImageManager
from smartvm.images.releases import ImageManager, check_version

_err = Console(stderr=True)

PresetChoice = Literal["latest", "lts", "hosted"]

_CACHE_DIR = typer.Option(DEFAULT_CACHE_DIR, "--cache-dir", help="Base image cache directory.")
_DATA_DIR = typer.Option(Path("/tmp/.smartvm"), "--data-dir", help="Where Firecracker binaries live.")
_PRESET = typer.Option(
    None, "--preset", help="latest | lts | hosted (default: hosted with a manifest, else latest)."
)
_MANIFEST_PATH = typer.Option(None, "--manifest-path", help="Local manifest (schema 1) file.")
_NO_CHECKSUM = typer.Option(
    False,
    "--insecure-no-checksum",
    help="Install a Firecracker release that publishes no sha256 (refused otherwise).",
)
_MAX_STORED = typer.Option(2, "--max-stored", help="Keep at most this many bundles (least recently used go).")


def register(app: typer.Typer) -> None:
    """Add the ``images`` sub-command group to ``app``."""
    images_app = typer.Typer(name="images", help="Kernels, root filesystems and Firecracker binaries.")
    images_app.command("list")(list_images)
    images_app.command("pull")(pull)
    images_app.command("prune")(prune)
    images_app.command("firecracker")(firecracker)
    add_build_commands(images_app)
    app.add_typer(images_app, name="images")


def list_images(
    cache_dir: Path = _CACHE_DIR,
    data_dir: Path = _DATA_DIR,
) -> None:
    """List cached base image bundles (most recently used first) and installed Firecracker versions."""
    manager = BaseImageManager(cache_dir, 1 << 30)
    bundles = manager.list_cached_bundles()
    table = Table(title=f"base image bundles in {manager.get_cache_dir()}")
    for column in ("bundle", "source", "arch", "rootfs", "firecracker", "directory"):
        table.add_column(column)
    for b in bundles:
        table.add_row(
            b.bundle_id, b.source, b.arch, b.rootfs_type, b.firecracker_version or "-", str(b.directory)
        )
    console = Console(width=200)
    console.print(table)
    versions = ImageManager(data_dir).list_versions()
    console.print(
        f"firecracker binaries in {data_dir / 'bin'}: {', '.join(versions) if versions else 'none'}"
    )


def pull(
    preset: PresetChoice | None = _PRESET,
    manifest_url: str | None = typer.Option(None, "--manifest-url", help="Hosted manifest (schema 1) URL."),
    manifest_path: Path | None = _MANIFEST_PATH,
    arch: str = typer.Option("x86_64", "--arch", help="x86_64 or aarch64."),
    force: bool = typer.Option(False, "--force", help="Download again even when the cache is intact."),
    with_firecracker: bool = typer.Option(
        False, "--with-firecracker", help="Also install the bundle's Firecracker release into --data-dir."
    ),
    data_dir: Path = _DATA_DIR,
    cache_dir: Path = _CACHE_DIR,
    max_stored: int = _MAX_STORED,
    insecure_no_checksum: bool = _NO_CHECKSUM,
) -> None:
    """Download (or verify the cached copy of) a base image bundle; prints its directory last."""
    chosen: PresetChoice = preset or ("hosted" if manifest_url or manifest_path else "latest")
    manager = BaseImageManager(cache_dir, max_stored, arch=arch)
    bundle = asyncio.run(
        manager.ensure_base_image(
            chosen, arch=arch, force_download=force, manifest_url=manifest_url, manifest_path=manifest_path
        )
    )
    _describe(bundle)
    if with_firecracker and bundle.firecracker_version is not None:
        binary = asyncio.run(
            ImageManager(data_dir, arch=arch, allow_unverified=insecure_no_checksum).download_firecracker(
                bundle.firecracker_version
            )
        )
        _err.print(f"firecracker  {binary}")
    typer.echo(str(bundle.directory))


def firecracker(
    version: str | None = typer.Option(None, "--version", help="vX.Y.Z (default: the latest release)."),
    arch: str = typer.Option("x86_64", "--arch", help="x86_64 or aarch64."),
    data_dir: Path = _DATA_DIR,
    insecure_no_checksum: bool = _NO_CHECKSUM,
) -> None:
    """Install a Firecracker release (firecracker + jailer, checksum-verified) into --data-dir;
    prints the firecracker path last. An installed version is reused."""
    manager = ImageManager(data_dir, arch=arch, allow_unverified=insecure_no_checksum)

    async def install() -> Path:
        chosen = check_version(version or await manager.get_latest_version())
        if manager.has_binary(chosen):
            _err.print(f"firecracker {chosen} is already installed")
            return manager.get_firecracker_path(chosen)
        return await manager.download_firecracker(chosen)

    binary = asyncio.run(install())
    _err.print(f"jailer  {binary.parent / 'jailer'}")
    typer.echo(str(binary))


def prune(
    keep: str | None = typer.Option(None, "--keep", help="Never evict this bundle id."),
    cache_dir: Path = _CACHE_DIR,
    max_stored: int = _MAX_STORED,
) -> None:
    """Evict least recently used bundles beyond --max-stored; prints each evicted bundle id."""
    for bundle_id in BaseImageManager(cache_dir, max_stored).prune_base_image_cache(keep_bundle_id=keep):
        typer.echo(bundle_id)


def _describe(bundle: BaseImageBundle) -> None:
    _err.print(f"[green]ready[/] {bundle.bundle_id} ({bundle.source}, {bundle.arch})")
    _err.print(f"kernel       {bundle.kernel_path}")
    _err.print(f"rootfs       {bundle.rootfs_path} ({bundle.rootfs_type})")
    _err.print(f"boot args    {bundle.boot_args}")
    _err.print(f"firecracker  {bundle.firecracker_version or '-'}")
