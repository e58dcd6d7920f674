"""Guest presets: a ready :class:`MicroVMConfig` booting one of the default guest images.

The image (guest kernel + a busybox or Debian root filesystem with the agent) is built and cached
on first use, which takes minutes the very first time and a few file hashes after that, so the async
:func:`guest_config` runs it in a worker thread; :func:`build_guest_config` (and
``smartvm.sync.guest_config``) is the blocking twin for scripts. :func:`start_guest` starts one
the way ``smartvm run`` and ``smartvm start`` do: restored from a cached snapshot of the ready guest
(``smartvm.sandbox.run_snapshots``), or booted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, get_args

from smartvm.config import BootSource, Drive, Entropy, MachineConfig, MicroVMConfig
from smartvm.errors import ErrorCode, SmartVMError

if TYPE_CHECKING:
    from smartvm.images.guest_image import GuestImage
    from smartvm.orchestrator import SmartVM
    from smartvm.vm import MicroVM

GuestKind = Literal["busybox", "debian"]
GUEST_KINDS: tuple[str, ...] = get_args(GuestKind)


def build_guest_config(
    kind: GuestKind = "busybox", *, cpus: int = 1, memory_mib: int = 256, vm_id: str | None = None
) -> MicroVMConfig:
    """A VM config booting the default guest image of ``kind`` (blocking: may build the image)."""
    _check_kind(kind)
    machine = MachineConfig(vcpu_count=cpus, mem_size_mib=memory_mib)  # checked before any build
    config = image_config(_default_image(kind), machine)
    if vm_id is not None:
        config.id = vm_id
    return config


def _check_kind(kind: str) -> None:
    if kind not in GUEST_KINDS:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"guest kind must be one of {', '.join(GUEST_KINDS)}, not {kind!r}"
        )


def _default_image(kind: GuestKind) -> GuestImage:
    from smartvm.images.guest_image import ensure_default_guest

    return ensure_default_guest(kind=kind)


def image_config(image: GuestImage, machine: MachineConfig, *, hostname: str | None = None) -> MicroVMConfig:
    """A VM config booting ``image`` in the shape ``machine`` (with the guest's hostname, when given)."""
    boot_args = image.boot_args if hostname is None else f"{image.boot_args} smartvm.hostname={hostname}"
    return MicroVMConfig(
        boot_source=BootSource(kernel_image_path=str(image.kernel_path), boot_args=boot_args),
        machine_config=machine,
        # virtio-rng: without it the guest's entropy pool starts empty and the agent's Python blocks
        # in getrandom() at start-up (measured under TCG: agent ready after 3.4 s without, 2.0 s with)
        entropy=Entropy(),
        drives=[
            Drive(
                drive_id="rootfs",
                path_on_host=str(image.rootfs_path),
                is_root_device=True,
                is_read_only=image.rootfs_type == "squashfs",
            )
        ],
    )


async def guest_config(
    kind: GuestKind = "busybox", *, cpus: int = 1, memory_mib: int = 256, vm_id: str | None = None
) -> MicroVMConfig:
    """A VM config booting the default guest image of ``kind``; a first build runs off the event loop."""
    return await asyncio.to_thread(build_guest_config, kind, cpus=cpus, memory_mib=memory_mib, vm_id=vm_id)


async def start_guest(
    svm: SmartVM,
    kind: GuestKind = "busybox",
    *,
    cpus: int = 1,
    memory_mib: int = 256,
    vm_id: str | None = None,
    cold: bool = False,
    detachable: bool = False,
    ready_timeout: float = 60.0,
    progress: Callable[[str], None] = lambda step: None,
) -> MicroVM:
    """A running VM of the default guest ``kind`` whose agent answers, with its id as hostname:
    restored from the cached snapshot of that guest and shape (made first if there is none, telling
    ``progress`` its steps), or booted when ``cold``. Nothing is left running if a step fails."""
    from smartvm.config import new_vm_id

    _check_kind(kind)
    machine = MachineConfig(vcpu_count=cpus, mem_size_mib=memory_mib)
    vm_id = vm_id or new_vm_id()
    image = await asyncio.to_thread(_default_image, kind)
    if not cold:
        from smartvm.sandbox.run_snapshots import spec_for, start_from_snapshot

        return await start_from_snapshot(
            spec_for(image, cpus=cpus, memory_mib=memory_mib),
            svm=svm,
            vm_id=vm_id,
            hostname=vm_id,
            ready_timeout=ready_timeout,
            detachable=detachable,
            progress=progress,
        )
    config = image_config(image, machine, hostname=vm_id)
    config.id = vm_id
    vm = await svm.create_vm(config, detachable=detachable)
    try:
        await vm.start()
        await vm.wait_ready(ready_timeout)
    except BaseException:
        await asyncio.shield(vm.kill())
        raise
    return vm
