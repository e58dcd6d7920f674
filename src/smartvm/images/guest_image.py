"""The default guest: a kernel and root filesystem built locally (or reused from the cache).

This is what `smartvm run`, the QEMU engine tests and the agent tests boot. When both artifacts
are cached it costs a few ``stat`` calls and hashes of small files (the agent, our init files),
so calling it before every boot is fine; a changed agent rebuilds the root filesystem (seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from smartvm.images.kernel_build import build_kernel
from smartvm.images.rootfs_build import RootfsFormat, RootfsKind, build_rootfs

if TYPE_CHECKING:  # the bundle cache (httpx, manifests) is imported only to register a bundle
    from smartvm.images.base_images import BaseImageBundle

BASE_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"


def boot_args_for(rootfs_type: str) -> str:
    """Kernel command line for a root filesystem on the first virtio block device."""
    if rootfs_type == "squashfs":
        return f"{BASE_BOOT_ARGS} root=/dev/vda ro rootfstype=squashfs"
    return f"{BASE_BOOT_ARGS} root=/dev/vda rw"


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: uncompressed kernel, root filesystem image, its type and boot arguments."""

    kernel_path: Path
    rootfs_path: Path
    rootfs_type: str
    boot_args: str


def ensure_default_guest(
    *,
    kind: RootfsKind = "busybox",
    fmt: RootfsFormat = "ext4",
    cache_dir: Path | None = None,
    progress: bool | None = None,
) -> GuestImage:
    """Build or reuse the guest kernel and a ``kind`` root filesystem (with the agent and init).

    The returned files are shared cache entries: boot them read-only or stage a copy-on-write
    clone (``smartvm.host.storage.clone_file``) before a guest writes to them.
    """
    kernel = build_kernel(cache_dir=cache_dir, progress=progress)
    rootfs = build_rootfs(kind, fmt=fmt, cache_dir=cache_dir, progress=progress)
    return GuestImage(kernel_path=kernel, rootfs_path=rootfs, rootfs_type=fmt, boot_args=boot_args_for(fmt))


def register_guest_bundle(
    image: GuestImage, *, kind: str, bundle_cache_dir: Path | None = None, max_stored: int = 2
) -> BaseImageBundle:
    """Enter a locally built guest into the base image cache as a ``local`` bundle.

    The bundle id names the kind and the build cache keys of both artifacts, so a rebuild makes a
    new bundle and an unchanged one is reused; downstream code then treats built and downloaded
    images alike. ``bundle_cache_dir`` defaults to ``base_images.DEFAULT_CACHE_DIR``.
    """
    from smartvm.images.base_images import DEFAULT_CACHE_DIR, BaseImageManager

    keys = f"{image.kernel_path.parent.name[:8]}-{image.rootfs_path.parent.name[:8]}"
    bundle_id = f"local-{kind}-{image.rootfs_type}-{keys}"
    manager = BaseImageManager(bundle_cache_dir or DEFAULT_CACHE_DIR, max_stored)
    return manager.register_local_bundle(
        bundle_id,
        image.kernel_path,
        image.rootfs_path,
        "squashfs" if image.rootfs_type == "squashfs" else "ext4",
        image.boot_args,
    )
