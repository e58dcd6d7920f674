"""SmartVM: options, the registry of live VMs, binaries, and creating, restoring or attaching VMs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from smartvm.config import MicroVMConfig, new_vm_id, parse_config
from smartvm.engine import NetworkOverride, select_engine
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.sweep import sweep as sweep_runtime_dirs
from smartvm.options import SmartVMOptions
from smartvm.snapshot import Snapshot
from smartvm.vm import DriveLayer, MicroVM, VMState
from smartvm.vm_records import VMRecord, VMRecordStore

log = logging.getLogger(__name__)


class SmartVM:
    """Creates and tracks microVMs on one host.

    Use as ``async with SmartVM() as svm:`` to stop every VM on exit.
    """

    def __init__(self, options: SmartVMOptions | None = None) -> None:
        self.options = options or SmartVMOptions()
        self._vms: dict[str, MicroVM] = {}
        self._engine_name: str | None = None

    # --- engine and binaries --------------------------------------------------------------------
    @property
    def engine_name(self) -> str:
        """The engine new VMs use (``auto`` resolved once per SmartVM)."""
        if self._engine_name is None:
            self._engine_name = select_engine(self.options)
        return self._engine_name

    async def ensure_binary(self) -> Path:
        """The hypervisor binary for the selected engine, downloading Firecracker if needed."""
        if self.engine_name == "qemu":
            from smartvm.qemu.process import find_qemu

            return find_qemu(self.options)
        from smartvm.firecracker.binary import find_firecracker

        found = find_firecracker(self.options)
        if found is not None:
            return found
        from smartvm.images.releases import ImageManager

        images = ImageManager(
            self.options.data_dir,
            arch=self.options.arch,
            release_base_url=self.options.release_base_url,
            ci_bucket_url=self.options.ci_bucket_url,
            allow_unverified=self.options.allow_unverified_firecracker,
        )
        version = self.options.firecracker_version or await images.get_latest_version()
        if not images.has_binary(version):
            await images.download_firecracker(version)
        return images.get_firecracker_path(version)

    # --- VMs ------------------------------------------------------------------------------------
    async def create_vm(
        self, config: MicroVMConfig | dict[str, Any], *, netns: str | None = None, detachable: bool = False
    ) -> MicroVM:
        """A new, not yet started VM (call ``await vm.start()``).

        Its hypervisor dies with this process (even on SIGKILL) unless ``detachable``: only then may
        :meth:`MicroVM.detach` hand it over (a sweep cleans up if this process dies before that).
        """
        cfg = config if isinstance(config, MicroVMConfig) else parse_config(config)
        return self._new_vm(cfg, self.engine_name, netns=netns, detachable=detachable)

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

    def _new_vm(self, config: MicroVMConfig, engine: str, *, netns: str | None, detachable: bool) -> MicroVM:
        """A registered, not yet started MicroVM of this SmartVM."""
        return self._register(
            MicroVM(config, self.options, engine, netns=netns, on_stopped=self._forget, detachable=detachable)
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
        """Stop everything and remove the runtime root if nothing else uses it."""
        await self.stop_all()
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
