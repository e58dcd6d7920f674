"""``smartvm images build-kernel`` and ``build-rootfs``: local builds into the shared cache.

Each prints the artifact path as the last line on stdout (``path=$(smartvm images build-kernel | tail -n1)``);
progress and messages go to stderr.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.base_images import DEFAULT_CACHE_DIR


class RootfsKindChoice(StrEnum):
    busybox = "busybox"
    debian = "debian"
    dir = "dir"
    tar = "tar"


class RootfsFormatChoice(StrEnum):
    ext4 = "ext4"
    squashfs = "squashfs"


_SOURCE_KERNEL = typer.Option(
    None, "--source", help="Kernel tarball or clean kernel tree (default: Debian's linux-source-6.1)."
)
_FORCE = typer.Option(False, "--force", help="Rebuild even when a cached result exists.")
_CACHE = typer.Option(
    None, "--cache-dir", help="Cache root (default: $SMARTVM_CACHE_DIR or ~/.cache/smartvm)."
)
_KIND = typer.Option(RootfsKindChoice.busybox, "--kind", help="Base: busybox | debian | dir | tar.")
_SOURCE_ROOTFS = typer.Option(
    None, "--source", help="The base directory (--kind dir) or tarball (--kind tar)."
)
_FORMAT = typer.Option(RootfsFormatChoice.ext4, "--format", help="Image format: ext4 | squashfs.")
_SIZE = typer.Option(None, "--size-mib", help="ext4 size in MiB (default: content + 64 MiB).")
_NO_AGENT = typer.Option(False, "--no-agent", help="Leave out the guest agent (and, for busybox, Python).")


def build_kernel_command(
    source: Path | None = _SOURCE_KERNEL, force: bool = _FORCE, cache_dir: Path | None = _CACHE
) -> None:
    """Build (or reuse) the guest kernel; print the vmlinux path last."""
    from smartvm.images.kernel_build import build_kernel

    typer.echo(str(build_kernel(source, cache_dir=cache_dir, force=force)))


def build_rootfs_command(
    kind: RootfsKindChoice = _KIND,
    source: Path | None = _SOURCE_ROOTFS,
    fmt: RootfsFormatChoice = _FORMAT,
    size_mib: int | None = _SIZE,
    no_agent: bool = _NO_AGENT,
    force: bool = _FORCE,
    cache_dir: Path | None = _CACHE,
) -> None:
    """Build (or reuse) a guest root filesystem; print the image path last."""
    from smartvm.images.rootfs_build import build_rootfs

    path = build_rootfs(
        kind.value,
        source=source,
        fmt=fmt.value,
        size_mib=size_mib,
        cache_dir=cache_dir,
        force=force,
        with_agent=not no_agent,
    )
    typer.echo(str(path))


_BUNDLE_CACHE = typer.Option(
    DEFAULT_CACHE_DIR, "--bundle-cache-dir", help="Base image bundle cache to register in."
)


def build_bundle_command(
    kind: RootfsKindChoice = _KIND,
    fmt: RootfsFormatChoice = _FORMAT,
    cache_dir: Path | None = _CACHE,
    bundle_cache_dir: Path = _BUNDLE_CACHE,
) -> None:
    """Build (or reuse) kernel + root filesystem and register them as a local bundle; print its dir last."""
    from smartvm.images.guest_image import ensure_default_guest, register_guest_bundle

    if kind in (RootfsKindChoice.dir, RootfsKindChoice.tar):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, "build takes --kind busybox or debian; use build-rootfs"
        )
    image = ensure_default_guest(kind=kind.value, fmt=fmt.value, cache_dir=cache_dir)  # type: ignore[arg-type]
    bundle = register_guest_bundle(image, kind=kind.value, bundle_cache_dir=bundle_cache_dir)
    typer.echo(str(bundle.directory))


def add_build_commands(images_app: typer.Typer) -> None:
    """Register ``build-kernel``, ``build-rootfs`` and ``build`` on the ``images`` command group."""
    images_app.command("build-kernel")(build_kernel_command)
    images_app.command("build-rootfs")(build_rootfs_command)
    images_app.command("build")(build_bundle_command)
