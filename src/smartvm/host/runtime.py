"""Per-VM runtime directories: sockets, logs and staged (ephemeral) drives, on tmpfs when possible.

A runtime dir belongs to exactly one VM and is removed with everything in it when the VM stops
or fails to start; nothing in it outlives the VM. Its ``owner.json`` (written first, see sweep.py)
lets a later smartvm command remove it when its owner was killed.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from smartvm.config import Drive, MicroVMConfig
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import check_private_dir, ensure_private_dir, make_private
from smartvm.host.storage import clone_file
from smartvm.host.sweep import claim

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def sanitize_id(vm_id: str) -> str:
    """A VM id made safe as one path component."""
    safe = _UNSAFE.sub("_", vm_id).lstrip(".")
    if not safe:
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"VM id {vm_id!r} has no usable characters")
    return safe[:64]


@dataclass
class VMRuntime:
    """The host-side home of one VM."""

    vm_id: str
    dir: Path
    netns: str | None = None
    staged: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path, vm_id: str, *, netns: str | None = None) -> VMRuntime:
        ensure_private_dir(root)
        path = root / sanitize_id(vm_id)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError as exc:
            raise SmartVMError(
                ErrorCode.DUPLICATE_VM_ID,
                f"runtime dir {path} already exists: a VM with id {vm_id!r} is running or was not "
                "cleaned up; "
                "stop it or run 'smartvm network sweep' / remove the directory",
            ) from exc
        try:
            ensure_private_dir(path)  # created above by us; checked against a umask that opens it
            claim(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(vm_id=vm_id, dir=path, netns=netns)

    @classmethod
    def existing(cls, path: Path, vm_id: str, *, netns: str | None = None) -> VMRuntime:
        """The existing runtime dir ``path`` of a running VM, checked to be private (UNSAFE_DIRECTORY)."""
        if not check_private_dir(path):
            raise SmartVMError(ErrorCode.VM_NOT_FOUND, f"runtime dir {path} of VM {vm_id!r} is gone")
        return cls(vm_id=vm_id, dir=path, netns=netns)

    # Well-known paths, so engines, agent and CLI agree.
    @property
    def api_socket(self) -> Path:
        return self.dir / "firecracker.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def vsock_socket(self) -> Path:
        return self.dir / "vsock.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def engine_log(self) -> Path:
        return self.dir / "engine.log"

    @property
    def drives_dir(self) -> Path:
        return self.dir / "drives"

    def stage_drive(self, drive: Drive) -> Path:
        """A private copy-on-write copy of the drive's image inside this runtime dir."""
        ensure_private_dir(self.drives_dir)
        target = self.drives_dir / f"{sanitize_id(drive.drive_id)}{Path(drive.path_on_host).suffix}"
        if not Path(drive.path_on_host).is_file():
            raise SmartVMError(
                ErrorCode.STAGING_FAILED,
                f"drive {drive.drive_id!r}: image {drive.path_on_host} does not exist or is not a file",
            )
        clone_file(drive.path_on_host, target)
        make_private(target)
        self.staged[drive.drive_id] = target
        return target

    def stage_drives(self, config: MicroVMConfig, *, ephemeral_writable: bool) -> MicroVMConfig:
        """Return a copy of ``config`` whose ephemeral drives point at staged copies.

        Writable drives are staged unless ``ephemeral_writable`` is off or the drive says
        ``ephemeral=False``; read-only drives only when the drive says ``ephemeral=True``.
        """
        drives = []
        for drive in config.drives:
            wanted = (
                drive.ephemeral
                if drive.ephemeral is not None
                else (ephemeral_writable and not drive.is_read_only)
            )
            if wanted:
                drive = drive.model_copy(update={"path_on_host": str(self.stage_drive(drive))})
            drives.append(drive)
        return config.model_copy(update={"drives": drives})

    def remove(self) -> None:
        """Delete the runtime dir and everything in it; safe to call twice."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.staged.clear()

    def exists(self) -> bool:
        return self.dir.exists()


def list_runtime_dirs(root: Path) -> list[Path]:
    """Runtime dirs present under ``root`` (for sweeps and ``smartvm ps``)."""
    if not check_private_dir(root):
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
