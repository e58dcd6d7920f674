"""SmartVM: options, the registry of live VMs, its managers, and creating, restoring or attaching VMs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from smartvm.config import MicroVMConfig, new_vm_id, parse_config
from smartvm.engine import NetworkOverride
from smartvm.engines import choose_engine
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.sweep import sweep as sweep_runtime_dirs
from smartvm.options import SmartVMOptions
from smartvm.snapshot import Snapshot
from smartvm.vm import DriveLayer, MicroVM, VMState
from smartvm.vm_network import BridgeNetwork, VMNetwork, needs_taps, network_for
from smartvm.vm_records import VMRecord, VMRecordStore

if TYPE_CHECKING:
    from smartvm.host.netns import NetworkSlot, SlotPool
    from smartvm.host.network import NetworkManager
    from smartvm.images.base_images import BaseImageBundle, BaseImageManager, Preset
    from smartvm.images.releases import ImageManager

log = logging.getLogger(__name__)


class SmartVM:
    """Creates and tracks microVMs on one host.

    Use as ``async with SmartVM() as svm:`` to stop every VM on exit.
    """

    def __init__(self, options: SmartVMOptions | None = None) -> None:
        self.options = options or SmartVMOptions()
        self._vms: dict[str, MicroVM] = {}
        self._engine_name: str | None = None

    # --- managers (built from the options on first use) --------------------------------------------
    @cached_property
    def image_manager(self) -> ImageManager:
        """Firecracker binaries and loose kernels/root filesystems under ``options.data_dir``."""
        from smartvm.images.releases import ImageManager

        o = self.options
        return ImageManager(
            o.data_dir,
            o.arch,
            release_base_url=o.release_base_url,
            ci_bucket_url=o.ci_bucket_url,
            allow_unverified=o.allow_unverified_firecracker,
        )

    @cached_property
    def base_image_manager(self) -> BaseImageManager:
        """Base image bundles in ``options.base_image_cache_dir`` (default ``<data_dir>/base-images``)."""
        from smartvm.images.base_images import BaseImageManager

        o = self.options
        return BaseImageManager(
            o.base_image_cache_dir or o.data_dir / "base-images",
            o.max_stored_base_images,
            arch=o.arch,
            ci_bucket_url=o.ci_bucket_url,
            release_base_url=o.release_base_url,
            manifest_url=o.base_image_manifest_url,
            manifest_path=o.base_image_manifest_path,
        )

    @cached_property
    def network_manager(self) -> NetworkManager:
        """The bridge ``options.bridge_name`` on ``options.subnet``: VMs whose network interface has no
        ``host_dev_name`` get a TAP device on it (leases in ``<data_dir>/network``)."""
        from smartvm.host.network import NetworkManager

        o = self.options
        return NetworkManager(o.bridge_name, o.subnet, state_dir=o.data_dir / "network")

    async def ensure_base_image(
        self,
        preset: Preset = "latest",
        arch: str | None = None,
        force_download: bool = False,
        manifest_url: str | None = None,
        manifest_path: Path | None = None,
    ) -> BaseImageBundle:
        """A verified base image bundle (see :meth:`BaseImageManager.ensure_base_image`)."""
        return await self.base_image_manager.ensure_base_image(
            preset, arch, force_download, manifest_url, manifest_path
        )

    # --- engine and binaries --------------------------------------------------------------------
    async def select_engine(self) -> str:
        """The engine new VMs use: ``auto`` is resolved once per SmartVM, off the event loop (deciding
        may run a KVM probe guest for a few seconds)."""
        if self._engine_name is None:
            self._engine_name = await choose_engine(self.options)
        return self._engine_name

    async def ensure_binary(self) -> Path:
        """The hypervisor binary for the selected engine, downloading Firecracker if needed."""
        if await self.select_engine() == "qemu":
            from smartvm.qemu.process import find_qemu

            return find_qemu(self.options)
        from smartvm.firecracker.binary import find_firecracker

        found = find_firecracker(self.options)
        if found is not None:
            return found
        images = self.image_manager
        version = self.options.firecracker_version or await images.get_latest_version()
        if not images.has_binary(version):
            await images.download_firecracker(version)
        return images.get_firecracker_path(version)

    # --- VMs ------------------------------------------------------------------------------------
    async def create_vm(
        self,
        config: MicroVMConfig | dict[str, Any],
        *,
        netns: str | None = None,
        detachable: bool = False,
        network: NetworkSlot | SlotPool | None = None,
    ) -> MicroVM:
        """A new, not yet started VM (call ``await vm.start()``).

        Networking when asked: a network interface without ``host_dev_name`` gets a TAP device on
        :attr:`network_manager`'s bridge, the next free address and a MAC derived from it when the VM
        starts (removed when it stops). ``network=slot`` runs the VM in that slot's namespace, and
        ``network=pool`` in a slot of that pool for as long as it runs: the interface (``eth0`` when
        the config has none), its MAC and the kernel's ``ip=`` argument are filled in either way.

        Its hypervisor dies with this process (even on SIGKILL) unless ``detachable``: only then may
        :meth:`MicroVM.detach` hand it over (a sweep cleans up if this process dies before that).
        """
        cfg = config if isinstance(config, MicroVMConfig) else parse_config(config)
        attach: VMNetwork | None = None
        if network is not None:
            if netns is not None:
                raise SmartVMError(
                    ErrorCode.INVALID_ARGUMENT,
                    "pass either network= or netns=, not both (a slot has its own)",
                )
            attach = network_for(network)
        elif needs_taps(cfg):
            attach = BridgeNetwork(self.network_manager)
        if attach is not None:
            attach.check(cfg)
            if detachable and attach.managed:
                raise SmartVMError(
                    ErrorCode.INVALID_ARGUMENT,
                    "a detachable VM cannot use a TAP device or slot this SmartVM makes (they end with "
                    "it): give its interface an existing host_dev_name, or pass a NetworkSlot you own",
                )
        return self._new_vm(
            cfg, await self.select_engine(), netns=netns, detachable=detachable, network=attach
        )

    async def restore_vm(
        self,
        snapshot_dir: str | Path,
        *,
        vm_id: str | None = None,
        resume_vm: bool = True,
        network_overrides: Sequence[NetworkOverride] = (),
        netns: str | None = None,
        detachable: bool = False,
        drive_paths: Mapping[str, str | Path] | None = None,
        drive_layers: Mapping[str, DriveLayer] | None = None,
    ) -> MicroVM:
        """A running VM restored from a snapshot directory made by :meth:`MicroVM.create_snapshot`.

        Every restored VM gets its own copy-on-write copy of the snapshot's disks, so several clones
        of one snapshot run at once without seeing each other's writes. ``drive_paths`` (drive id ->
        host file) gives drives to use in place instead: they must hold what the disks held at the
        snapshot (a snapshot taken with ``copy_disks=False`` needs them for its writable drives).
        ``drive_layers`` (drive id -> function) does the same with a file made inside the VM's runtime
        dir once it exists (say a copy-on-write layer over a base image), so that it is removed with
        the VM, also by the sweep after this process was killed.
        """
        snapshot = Snapshot.load(snapshot_dir)
        config = snapshot.vm_config()
        config = config.model_copy(update={"id": vm_id or new_vm_id()})
        if drive_paths or drive_layers:
            config, snapshot = _use_drives(config, snapshot, drive_paths or {}, set(drive_layers or ()))
        vm = self._new_vm(config, snapshot.engine, netns=netns, detachable=detachable)
        try:
            await vm.restore_from(
                snapshot,
                resume_vm=resume_vm,
                network_overrides=network_overrides,
                drive_layers=drive_layers,
            )
        except BaseException:
            self._forget(vm)
            raise
        return vm

    # --- detached VMs (records under <data_dir>/vms) ---------------------------------------------
    @property
    def records(self) -> VMRecordStore:
        return VMRecordStore(self.options.data_dir)

    def detached_vms(self) -> list[VMRecord]:
        """Records of detached VMs whose hypervisor still runs (see :meth:`prune_detached`)."""
        return [r for r in self.records.records() if self.records.check(r) is None and r.is_alive()]

    def prune_detached(self) -> list[VMRecord]:
        """Remove the records (and runtime dirs) of detached VMs whose hypervisor is gone, drop records
        that do not describe a VM smartvm started (nothing else is touched for those), and sweep the
        runtime dirs whose owner is gone (:meth:`sweep`); returns the records removed."""
        gone = []
        for record in self.records.records():
            problem = self.records.check(record)
            if problem is not None:
                log.warning("ignoring and removing the record of VM %r: %s", record.id, problem)
                self.records.remove(record.id)
                gone.append(record)
            elif not record.is_alive():
                self.records.prune(record)
                gone.append(record)
        self.sweep()
        return gone

    def sweep(self) -> list[Path]:
        """Remove runtime dirs (ending their hypervisor, if provably ours) whose owner process is gone
        and that no detached VM's record owns; safe while other smartvm processes run. Dirs removed."""
        root = self.options.runtime_dir
        live = {r.runtime_dir for r in self.records.records() if r.is_alive()}
        return sweep_runtime_dirs(root, live, self.records.owns)

    async def attach_vm(self, vm_id: str) -> MicroVM:
        """Take over a VM detached earlier (by this or another process) with :meth:`MicroVM.detach`.

        Stop it, or :meth:`MicroVM.detach` it again to leave it running. VM_NOT_FOUND when there is no
        such record or its hypervisor is gone (such a record is pruned with its runtime dir).
        """
        record = self.records.load(vm_id)
        if record is None:
            raise SmartVMError(
                ErrorCode.VM_NOT_FOUND,
                f"no detached VM {vm_id!r} in {self.records.dir}; 'smartvm ps' lists them",
            )
        problem = self.records.check(record)
        if problem is not None:
            self.records.remove(record.id)  # planted or damaged: never act on it
            raise SmartVMError(
                ErrorCode.VM_NOT_FOUND, f"the record of VM {vm_id!r} was invalid and is removed: {problem}"
            )
        if not record.is_alive():
            self.records.prune(record)
            raise SmartVMError(
                ErrorCode.VM_NOT_FOUND, f"VM {vm_id!r} is no longer running (pid {record.pid} is gone)"
            )
        vm = self._register(
            MicroVM(
                parse_config(record.config),
                self.options,
                record.engine,
                netns=record.netns,
                on_stopped=self._forget,
                detachable=True,
            )
        )
        try:
            await vm.attach(record)
        except SmartVMError as exc:
            self._forget(vm)
            if exc.code is ErrorCode.VM_NOT_FOUND:  # it exited just now
                self.records.prune(record)
            raise
        except BaseException:
            self._forget(vm)
            raise
        return vm

    def _new_vm(
        self,
        config: MicroVMConfig,
        engine: str,
        *,
        netns: str | None,
        detachable: bool,
        network: VMNetwork | None = None,
    ) -> MicroVM:
        """A registered, not yet started MicroVM of this SmartVM."""
        return self._register(
            MicroVM(
                config,
                self.options,
                engine,
                netns=netns,
                on_stopped=self._forget,
                detachable=detachable,
                network=network,
            )
        )

    def _register(self, vm: MicroVM) -> MicroVM:
        if vm.id in self._vms:
            raise SmartVMError(
                ErrorCode.DUPLICATE_VM_ID, f"a VM with id {vm.id!r} already exists; pick another id"
            )
        self._vms[vm.id] = vm
        return vm

    def _forget(self, vm: MicroVM) -> None:
        if self._vms.get(vm.id) is vm:
            del self._vms[vm.id]

    def get_vm(self, vm_id: str) -> MicroVM | None:
        return self._vms.get(vm_id)

    def list_vms(self) -> list[MicroVM]:
        return list(self._vms.values())

    @property
    def vm_count(self) -> int:
        return len(self._vms)

    async def stop_all(self) -> None:
        """Stop every VM (gracefully, in parallel); the first failure is raised after all were tried."""
        vms = list(self._vms.values())
        results = await asyncio.gather(*(vm.stop() for vm in vms), return_exceptions=True)
        for vm in vms:
            if vm.state is VMState.CREATED:
                self._forget(vm)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def cleanup(self) -> None:
        """Stop everything, remove the bridge if this SmartVM made it and no VM of any process uses it
        any more, and remove the runtime root if nothing else uses it."""
        await self.stop_all()
        if "network_manager" in self.__dict__ and self.network_manager.in_use:
            await self.network_manager.cleanup()
        root = self.options.runtime_dir
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()

    def get_runtime_dir(self) -> Path:
        return self.options.runtime_dir

    async def __aenter__(self) -> SmartVM:
        self.sweep()  # what a killed smartvm process left behind
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.cleanup()


def _use_drives(
    config: MicroVMConfig, snapshot: Snapshot, drive_paths: Mapping[str, str | Path], later: set[str]
) -> tuple[MicroVMConfig, Snapshot]:
    """``config`` with the drives of ``drive_paths`` pointing at those files and those in ``later``
    (given their file at launch) used in place, and ``snapshot`` without its copies of either."""
    known = {d.drive_id for d in config.drives}
    unknown = sorted((set(drive_paths) | later) - known)
    if unknown:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"drive_paths names {', '.join(unknown)}, "
            f"not a drive of the snapshot ({', '.join(sorted(known))})",
        )
    drives = [
        d.model_copy(update={"path_on_host": str(drive_paths[d.drive_id]), "ephemeral": False})
        if d.drive_id in drive_paths
        else d.model_copy(update={"ephemeral": False})
        if d.drive_id in later
        else d
        for d in config.drives
    ]
    disks = {k: v for k, v in snapshot.disks.items() if k not in drive_paths and k not in later}
    return config.model_copy(update={"drives": drives}), dataclasses.replace(snapshot, disks=disks)
