"""Templates: a guest booted once, made ready and snapshotted, so that sandboxes are restored, not booted.

A template directory ``<data_dir>/templates/<name>/<key>/`` holds ``disk.img`` (the read-only base
image every sandbox's copy-on-write disk lies over) and ``snapshot/`` (the ready VM's state and
memory, taken without disk copies: the disk *is* ``disk.img``). ``key`` hashes every input, so a
changed kernel, root filesystem, shape or start command gives a new directory; a build happens in a
hidden sibling directory renamed into place at the end, so a crash never leaves half a template.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from smartvm.config import (
    BootSource,
    Drive,
    Entropy,
    MachineConfig,
    MicroVMConfig,
    NetworkInterface,
    with_boot_arg,
)
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import ensure_private_dir
from smartvm.host.storage import clone_file
from smartvm.images.build_steps import digest, file_identity
from smartvm.orchestrator import SmartVM
from smartvm.sandbox.settings import DEFAULT_USER
from smartvm.snapshot import Snapshot
from smartvm.vm import MicroVM

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # not imported at run time: `smartvm run` restores templates without a network
    from smartvm.host.netns import NetworkSlot, SlotPool

DISK_FILE = "disk.img"
SNAPSHOT_DIR = "snapshot"
ROOT_DRIVE = "rootfs"
TEMPLATE_FORMAT = "2"  # part of every key: bump when the layout of a template changes
Progress = Callable[[str], None]
# The guest kernel zeroes what it allocates. Under QEMU 7.2 every virtio-mmio queue has 1024 entries
# and the guest's virtio-console fills the receive queue of each agent port (and its control queue)
# with 4 KiB kmalloc buffers: 36 MB of a 256 MiB guest, each page non-zero (SLUB's free pointer) and
# so sent in full in every pause stream (79 MB for an idle sandbox). Zeroed, they go as zero pages
# (46 MB): a pause ~20 ms and a resume ~30 ms shorter under TCG. It costs ~4 % of a cold boot (the
# template build) and keeps stale kernel memory out of fresh allocations; a user's own value wins.
ZERO_ON_ALLOC = "init_on_alloc=1"
# A sandbox's network forwards IPv4 only (the host drops the rest, host/nat.py): the guest's rcS turns
# IPv6 off on eth0, so that no address detection, router solicitation or multicast report timers
# wake each guest restored from the template (they did, right while a resume waited for its agent).
IPV4_ONLY = "smartvm.ipv6=off"


@dataclass(frozen=True)
class TemplateSpec:
    """What a template is made of: a kernel + root filesystem and the default shape of its sandboxes."""

    name: str
    kernel: Path
    rootfs: Path
    boot_args: str
    cpus: int = 1
    memory_mib: int = 256
    env: Mapping[str, str] = field(default_factory=dict)
    start_command: str | None = None  # started in the background before the snapshot (as ``user``)
    ready_command: str | None = None  # run until it exits 0 before the snapshot
    user: str = DEFAULT_USER

    def key(self, engine: str) -> str:
        """The cache key: every input that changes the snapshot (files by path, size and mtime).
        TEMPLATE_BUILD_FAILED when the kernel or root filesystem is missing."""
        self.check_files()
        return digest(
            TEMPLATE_FORMAT,
            engine,
            file_identity(self.kernel),
            file_identity(self.rootfs),
            self.boot_args,
            str(self.cpus),
            str(self.memory_mib),
            json.dumps(dict(self.env), sort_keys=True),
            self.start_command or "",
            self.ready_command or "",
            self.user,
        )

    def check_files(self) -> None:
        for path, what in ((self.kernel, "kernel"), (self.rootfs, "root filesystem")):
            if not path.is_file():
                raise SmartVMError(
                    ErrorCode.TEMPLATE_BUILD_FAILED,
                    f"the {what} {path} of template {self.name!r} does not exist: build or fetch it first",
                )


async def base_template_spec(cpus: int = 1, memory_mib: int = 256) -> TemplateSpec:
    """``base``: the default guest (bash, python3, user ``user``), built and cached on first use."""
    from smartvm.images.guest_image import ensure_default_guest

    image = await asyncio.to_thread(ensure_default_guest, progress=False)
    return TemplateSpec(
        name="base",
        kernel=image.kernel_path,
        rootfs=image.rootfs_path,
        boot_args=image.boot_args,
        cpus=cpus,
        memory_mib=memory_mib,
    )


@dataclass(frozen=True)
class BuiltTemplate:
    """A ready template on disk."""

    name: str
    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / DISK_FILE

    @property
    def snapshot_dir(self) -> Path:
        return self.directory / SNAPSHOT_DIR

    def load(self) -> Snapshot:
        """The template's snapshot; SNAPSHOT_INVALID when its files are damaged or missing."""
        snapshot = Snapshot.load(self.snapshot_dir)
        if not self.disk.is_file():
            raise SmartVMError(ErrorCode.SNAPSHOT_INVALID, f"{self.disk} (template {self.name}) is missing")
        snapshot.check_files()
        return snapshot

    def is_complete(self) -> bool:
        try:
            self.load()
        except SmartVMError:
            return False
        return True


def vm_config_for(
    *,
    vm_id: str,
    kernel: Path,
    boot_args: str,
    cpus: int,
    memory_mib: int,
    disk: Path,
    slot: NetworkSlot | None,
) -> MicroVMConfig:
    """The VM of a template build: its disk used in place, its network in ``slot`` (the same guest
    address in every slot, so the snapshot restores into any other), or no network."""
    nics = (
        [NetworkInterface(iface_id="eth0", host_dev_name=slot.tap_name, guest_mac=slot.guest_mac)]
        if slot is not None
        else []
    )
    args = f"{boot_args} {slot.kernel_ip_arg('sandbox')}" if slot is not None else boot_args
    args = with_boot_arg(args, ZERO_ON_ALLOC)
    if slot is not None:
        args = with_boot_arg(args, IPV4_ONLY)
    return MicroVMConfig(
        id=vm_id,
        boot_source=BootSource(kernel_image_path=str(kernel), boot_args=args),
        machine_config=MachineConfig(vcpu_count=cpus, mem_size_mib=memory_mib),
        entropy=Entropy(),
        drives=[
            Drive(
                drive_id=ROOT_DRIVE,
                path_on_host=str(disk),
                is_root_device=True,
                is_read_only=False,
                ephemeral=False,
            )
        ],
        network_interfaces=nics,
    )


async def build_template(
    spec: TemplateSpec,
    dest: Path,
    *,
    svm: SmartVM,
    pool: SlotPool | None,
    ready_timeout: float,
    progress: Progress,
) -> BuiltTemplate:
    """Boot ``spec`` once, make it ready, snapshot it into ``dest`` (all or nothing). With a ``pool``
    the template gets the network every sandbox slot offers; without, no network at all.

    Raises TEMPLATE_BUILD_FAILED with the cause; nothing of the build is left behind.
    """
    work = dest.with_name(f".{dest.name}.build")
    shutil.rmtree(work, ignore_errors=True)  # a build killed earlier (the manager lock makes it ours)
    ensure_private_dir(work)
    # the tool that keeps its sandboxes' pause streams small, built (once) while the template boots
    tool = asyncio.ensure_future(asyncio.to_thread(_ensure_ramdiff))
    try:
        await _build_into(spec, work, svm=svm, pool=pool, ready_timeout=ready_timeout, progress=progress)
        await tool
        (work / DISK_FILE).chmod(0o400)  # the shared base of every sandbox's disk: never written again
        shutil.rmtree(dest, ignore_errors=True)  # an older build of the same inputs, damaged
        work.rename(dest)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(BaseException):  # never leave the build thread's result unretrieved
            await tool
        if isinstance(exc, SmartVMError) and exc.code is not ErrorCode.TEMPLATE_BUILD_FAILED:
            raise SmartVMError(
                ErrorCode.TEMPLATE_BUILD_FAILED, f"building template {spec.name!r} failed: {exc.message}"
            ) from exc
        raise
    return BuiltTemplate(spec.name, dest)


def _ensure_ramdiff() -> None:
    """Build ``ramdiff`` unless it is built; without it pauses still work (whole RAM), so a failure
    (it does not compile, the cache is not writable) is a warning, not a failed template."""
    from smartvm.qemu.ramdiff import build_ramdiff  # `smartvm run` restores templates: not there

    try:
        build_ramdiff()
    except (SmartVMError, OSError) as exc:
        log.warning("pauses will carry the whole guest RAM: %s", exc)


async def _build_into(
    spec: TemplateSpec,
    work: Path,
    *,
    svm: SmartVM,
    pool: SlotPool | None,
    ready_timeout: float,
    progress: Progress,
) -> None:
    spec.check_files()
    progress("copying the root filesystem")
    disk = work / DISK_FILE
    await asyncio.to_thread(clone_file, spec.rootfs, disk, mode=0o600)
    slot = await pool.acquire() if pool is not None else None
    try:
        config = vm_config_for(
            vm_id=f"tpl-{spec.name[:20]}-{int(time.time() * 1000) % 100000}",
            kernel=spec.kernel,
            boot_args=spec.boot_args,
            cpus=spec.cpus,
            memory_mib=spec.memory_mib,
            disk=disk,
            slot=slot,
        )
        vm = await svm.create_vm(config, netns=slot.netns_name if slot is not None else None)
        try:
            progress("booting")
            await vm.start()
            await vm.wait_ready(ready_timeout)
            env = dict(spec.env)
            if spec.start_command:
                progress("starting the start command")
                await vm.processes.start(
                    ["/bin/bash", "-l", "-c", spec.start_command], env=env, user=spec.user
                )
            if spec.ready_command:
                progress("waiting for the ready command")
                await _wait_ready_command(vm, spec, env, ready_timeout)
            progress("warming up the guest agent")
            await warm_up(vm, spec.user)
            progress("snapshotting")
            await vm.agent.sync()
            await vm.agent.close()  # the agent then waits for its next host in the snapshot: a
            await asyncio.sleep(0.3)  # restored clone's first connection is answered at once
            await vm.pause()
            snap = work / SNAPSHOT_DIR
            await vm.create_snapshot(snap / "vm.state", snap / "memory", copy_disks=False)
        finally:
            await vm.kill()
        await asyncio.to_thread(fill_memory_holes, snap / "memory")
    finally:
        if pool is not None and slot is not None:
            await pool.release(slot)


def fill_memory_holes(memory: Path) -> None:
    """Read-fault every page of a template's memory file once.

    The file is sparse (only the guest's non-zero pages are written), and the first read-fault of a
    hole through a mapping allocates a zeroed page for it: on tmpfs a page of the file itself, on a
    disk filesystem a page of the page cache (clean, reclaimable; no disk block). A sandbox's first
    pause does exactly that (QEMU's migration reads all of guest RAM): it paid ~140 ms more than later
    ones with the data dir on tmpfs, ~200 ms more on ext4 (the default /var/lib/smartvm), once per
    template. Done here, at build time, it costs ~100 ms and the memory the first pause would have
    taken anyway (the file's full size, shared by every sandbox of the template)."""
    if not memory.is_file():
        return
    with open(memory, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
        for offset in range(0, len(view), mmap.PAGESIZE):
            view[offset]  # one byte faults the page in; no copy of the rest


async def warm_up(vm: MicroVM, user: str) -> None:
    """Run each kind of agent request once before the snapshot, so that what the guest loads for
    them (Python modules, bytecode, libraries, bash) is already in memory in every clone."""
    probe = "/tmp/.smartvm-warm-up"
    await vm.exec(["/bin/bash", "-l", "-c", "true"], user=user)
    await vm.exec(["true"])
    await vm.files.write(probe, b"x", owner=user)
    await vm.files.read(probe)
    await vm.files.stat(probe)
    await vm.files.list("/tmp")
    await vm.files.remove(probe)
    info = await vm.processes.start(["true"], user=user)
    await vm.processes.wait(info.pid, 10)
    await vm.processes.list()
    await vm.agent.reseed()
    await vm.agent.set_time()


async def _wait_ready_command(vm: MicroVM, spec: TemplateSpec, env: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        result = await vm.exec(
            ["/bin/bash", "-l", "-c", spec.ready_command or "true"], env=env, user=spec.user, timeout=10
        )
        if result.exit_code == 0:
            return
        last = (result.stderr or result.stdout).decode(errors="replace")[-300:]
        await asyncio.sleep(0.2)
    raise SmartVMError(
        ErrorCode.TEMPLATE_BUILD_FAILED,
        f"the ready command of template {spec.name!r} did not succeed within {timeout:.0f}s: {last}",
    )
