"""One VM's jail as the Firecracker engine uses it: what goes in, under which name, and how it is found
again from a detach record.

A jailed Firecracker only sees paths under the jail root, so the engine sends it a translated copy of
the VM config (kernel, initrd, drives, logger, metrics and vsock at in-jail paths); the user's
MicroVMConfig is never changed. In-jail names are fixed (``/drives/<id><suffix>``,
``/run/vsock.sock``), so a snapshot taken in one jail restores in another without patching drives.

Ownership: the jail's uid must write the writable drives and the logger/metrics files, so they are
chowned to it. Staged drives are this VM's private copies; a writable drive with ``ephemeral=False``
and the logger/metrics files are the user's own files hard-linked in, so they change owner on the host
too (see :class:`~smartvm.options.JailerOptions`). Read-only files are never chowned: one the jail's
uid cannot read is refused with the fix, unless it had to be copied into the jail anyway.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smartvm.config import Drive, MicroVMConfig, Vsock
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.firecracker.binary import require_jailer
from smartvm.firecracker.jailer import Jail, JailerConfig
from smartvm.host.runtime import VMRuntime, sanitize_id
from smartvm.host.storage import clone_file
from smartvm.options import SmartVMOptions

VSOCK_IN_JAIL = "/run/vsock.sock"
_SNAPSHOT_OUT = "/snapshot"  # where Firecracker writes a snapshot before it is moved out
_RESTORE_IN = "/restore"  # where the files of a snapshot being loaded are linked in
_NOT_JAIL_ID = re.compile(r"[^A-Za-z0-9-]+")


def jail_id(vm_id: str) -> str:
    """The jailer's ``--id`` for a VM: letters, digits and '-' only (the jailer refuses others)."""
    safe = _NOT_JAIL_ID.sub("-", vm_id).strip("-")[:64]
    if not safe:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"VM id {vm_id!r} has no letters or digits for a jail id"
        )
    return safe


def open_jail(options: SmartVMOptions, runtime: VMRuntime, firecracker: Path) -> VMJail:
    """Find the jailer and create this VM's jail directory (JAILER_FAILED if it exists already)."""
    jo = options.jailer
    if jo is None:
        raise SmartVMError(ErrorCode.INVALID_STATE, "open_jail needs options.jailer")
    jail = Jail(
        JailerConfig(
            jailer_binary=require_jailer(options, firecracker),
            firecracker_binary=firecracker,
            vm_id=jail_id(runtime.vm_id),
            uid=jo.uid,
            gid=jo.gid,
            chroot_base_dir=jo.chroot_base_dir,
            netns=runtime.netns,
            cgroups=dict(jo.cgroups),
            cgroup_version=jo.cgroup_version,
            parent_cgroup=jo.parent_cgroup,
            resource_limits=dict(jo.resource_limits),
            daemonize=jo.daemonize,
            new_pid_ns=jo.new_pid_ns,
        )
    )
    try:
        jail.prepare()
    except OSError as exc:
        if not isinstance(exc, FileExistsError):  # created by someone else meanwhile: not ours to remove
            jail.cleanup()
        raise SmartVMError(
            ErrorCode.JAILER_FAILED,
            f"cannot create the jail {jail.root}: {exc.strerror or exc}; chroot_base_dir must be writable "
            "and smartvm must run as root to use the jailer",
        ) from exc
    return VMJail(jail, runtime.drives_dir)


class VMJail:
    """The files of one VM inside its jail, and the translation between host and in-jail paths."""

    def __init__(self, jail: Jail, staged_dir: Path | None = None) -> None:
        self.jail = jail
        self._staged_dir = staged_dir  # drives in here are this VM's private copies
        self._updates = 0

    def host_path(self, jail_path: str) -> Path:
        return self.jail.host_path(jail_path)

    # --- boot and restore ------------------------------------------------------------------------
    def boot_config(self, config: MicroVMConfig, vsock: Vsock) -> MicroVMConfig:
        """The config Firecracker is sent: every file it opens linked in, at its in-jail path."""
        boot = config.boot_source
        boot_update = {"kernel_image_path": self._read_only(boot.kernel_image_path, "/boot/")}
        if boot.initrd_path:
            boot_update["initrd_path"] = self._read_only(boot.initrd_path, "/boot/")
        update: dict[str, Any] = {
            "boot_source": boot.model_copy(update=boot_update),
            "drives": self.drives(config.drives),
            "vsock": vsock.model_copy(update={"uds_path": VSOCK_IN_JAIL}),
        }
        self.host_path(VSOCK_IN_JAIL).unlink(missing_ok=True)
        if config.logger is not None and config.logger.log_path:
            update["logger"] = config.logger.model_copy(
                update={"log_path": self._users_writable(config.logger.log_path, "/logs/")}
            )
        if config.metrics is not None:
            update["metrics"] = config.metrics.model_copy(
                update={"metrics_path": self._users_writable(config.metrics.metrics_path, "/metrics/")}
            )
        return config.model_copy(update=update)

    def drives(self, drives: Sequence[Drive], at: Mapping[str, str] | None = None) -> list[Drive]:
        """``drives`` linked into the jail; ``at`` names in-jail paths for some (a snapshot's recorded
        ones, so Firecracker finds them where the snapshot says)."""
        linked = []
        for drive in drives:
            default = "/drives/" + _drive_name(drive.drive_id, drive.path_on_host)
            name = (at or {}).get(drive.drive_id) or default
            path = self._drive(drive.path_on_host, name, read_only=drive.is_read_only)
            linked.append(drive.model_copy(update={"path_on_host": path}))
        return linked

    def update_drive(self, drive_id: str, path_on_host: str, *, read_only: bool) -> str:
        """Link the new backing file of a running VM's drive in; returns its in-jail path."""
        while True:  # a fresh name: Firecracker may still hold the previous file open
            self._updates += 1
            name = f"/drives/{_drive_name(f'{drive_id}-{self._updates}', path_on_host)}"
            if not os.path.lexists(self.host_path(name)):
                return self._drive(path_on_host, name, read_only=read_only)

    def forget(self, jail_path: str) -> None:
        """Remove one linked file from the jail (the host file is untouched)."""
        self.host_path(jail_path).unlink(missing_ok=True)

    def restore_body(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """A /snapshot/load body whose state and memory files (or page-fault socket) are in the jail."""
        body = dict(body)
        body["snapshot_path"] = self._read_only(body["snapshot_path"], f"{_RESTORE_IN}/", copy_private=True)
        backend = dict(body["mem_backend"])
        if backend["backend_type"] == "File":
            backend["backend_path"] = self._read_only(
                backend["backend_path"], f"{_RESTORE_IN}/", copy_private=True
            )
        else:  # a Unix socket cannot be copied; a hard link to it connects to the same listener
            backend["backend_path"] = self.jail.link_in(
                backend["backend_path"], f"{_RESTORE_IN}/uffd.sock", allow_copy=False
            )
        body["mem_backend"] = backend
        return body

    def old_vsock_path(self, recorded: str) -> Path:
        """Firecracker before 1.17 re-creates the vsock socket at its recorded path: here, in the jail."""
        host = self.host_path(recorded)
        self.jail.make_dir(str(Path(recorded).parent))
        host.unlink(missing_ok=True)
        return host

    # --- snapshots ---------------------------------------------------------------------------------
    def snapshot_targets(self, state_file: str, mem_file: str) -> tuple[str, str]:
        """In-jail paths for Firecracker to write a snapshot to (a fresh directory it may write)."""
        self.discard_snapshot()
        self.jail.make_dir(_SNAPSHOT_OUT)
        return f"{_SNAPSHOT_OUT}/{_plain(state_file)}", f"{_SNAPSHOT_OUT}/{_plain(mem_file)}"

    def collect_snapshot(self, snapshot_dir: Path, names: Sequence[str]) -> None:
        """Move what Firecracker wrote into ``snapshot_dir`` (renamed, or copied across filesystems),
        owned by us again; the jail's snapshot directory is emptied."""
        try:
            for name in names:
                source = self.host_path(f"{_SNAPSHOT_OUT}/{_plain(name)}")
                target = snapshot_dir / name
                part = target.with_name(target.name + ".part")
                part.unlink(missing_ok=True)
                try:
                    os.rename(source, part)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise SmartVMError(
                            ErrorCode.SNAPSHOT_FAILED,
                            f"cannot move {name} out of the jail {self.jail.root}: {exc.strerror}",
                        ) from exc
                    clone_file(source, part)
                os.chown(part, os.geteuid(), os.getegid())
                os.replace(part, target)
        finally:
            self.discard_snapshot()

    def discard_snapshot(self) -> None:
        """Empty the jail's snapshot directory (after a failed snapshot: no partial memory file stays)."""
        shutil.rmtree(self.host_path(_SNAPSHOT_OUT), ignore_errors=True)

    # --- detach record -----------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """What a later owner needs to find (and remove) this jail."""
        c = self.jail.config
        return {
            "jail_dir": str(self.jail.jail_dir),
            "jailer_binary": str(c.jailer_binary),
            "firecracker_binary": str(c.firecracker_binary),
            "id": c.vm_id,
            "uid": c.uid,
            "gid": c.gid,
            "chroot_base_dir": str(c.chroot_base_dir),
            "daemonize": c.daemonize,
            "new_pid_ns": c.new_pid_ns,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any], staged_dir: Path | None = None) -> VMJail:
        """The jail described by :meth:`record`; refused if the recorded directory does not match."""
        try:
            jail = Jail(
                JailerConfig(
                    jailer_binary=Path(data["jailer_binary"]),
                    firecracker_binary=Path(data["firecracker_binary"]),
                    vm_id=str(data["id"]),
                    uid=int(data["uid"]),
                    gid=int(data["gid"]),
                    chroot_base_dir=Path(data["chroot_base_dir"]),
                    daemonize=bool(data.get("daemonize")),
                    new_pid_ns=bool(data.get("new_pid_ns")),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SmartVMError(
                ErrorCode.INVALID_CONFIG, f"damaged jail record {dict(data)!r}: {exc}"
            ) from exc
        if str(jail.jail_dir) != data.get("jail_dir"):
            raise SmartVMError(
                ErrorCode.UNSAFE_PATH, f"jail record names {data.get('jail_dir')!r}, not {jail.jail_dir}"
            )
        return cls(jail, staged_dir)

    def cleanup(self) -> None:
        self.jail.cleanup()

    # --- linking -----------------------------------------------------------------------------------
    def _drive(self, path: str, name: str, *, read_only: bool) -> str:
        if read_only:
            return self._read_only(path, name)
        ours = self._staged_dir is not None and Path(path).parent == self._staged_dir
        # a staged copy may be copied again; the user's own drive must be linked or its writes are lost
        return self.jail.link_in(path, name, writable=True, allow_copy=ours)

    def _users_writable(self, path: str, prefix: str) -> str:
        """A file of the user's that Firecracker appends to (logger, metrics): it must exist first."""
        Path(path).touch()
        return self.jail.link_in(path, prefix + Path(path).name, writable=True, allow_copy=False)

    def _read_only(self, path: str, name: str, *, copy_private: bool = False) -> str:
        """Link a file Firecracker only reads; ``name`` ending in '/' is a directory for it.
        ``copy_private``: a file the jail cannot read (snapshot files are 0600) is copied, not refused."""
        in_jail = self.jail.link_in(path, name + Path(path).name if name.endswith("/") else name)
        target = self.host_path(in_jail)
        if not _readable_by(target.stat(), self.jail.config.uid, self.jail.config.gid):
            if copy_private and target.stat().st_ino == Path(path).stat().st_ino:
                target.unlink()  # the jail's own copy-on-write copy; the user's file keeps its owner
                clone_file(path, target)
            if target.stat().st_ino != Path(path).stat().st_ino:  # our own copy: hand it over
                os.chown(target, self.jail.config.uid, self.jail.config.gid)
            else:
                target.unlink()
                raise SmartVMError(
                    ErrorCode.JAILER_FAILED,
                    f"{path} is not readable by the jail's uid {self.jail.config.uid} / gid "
                    f"{self.jail.config.gid}; make it readable (chmod o+r) or change jailer uid/gid",
                )
        return in_jail


def remove_recorded_jail(engine_data: Mapping[str, Any]) -> None:
    """Remove the jail named in a detach record (for records of VMs that died while detached)."""
    data = engine_data.get("jail")
    if isinstance(data, Mapping):
        with contextlib.suppress(SmartVMError):
            VMJail.from_record(data).cleanup()


def _drive_name(drive_id: str, path: str) -> str:
    return f"{sanitize_id(drive_id)}{Path(path).suffix}"


def _plain(name: str) -> str:
    """A bare file name (snapshot files are named by the caller)."""
    if not name or "/" in name or name in (".", ".."):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"snapshot file name {name!r} must be a plain file name"
        )
    return name


def _readable_by(st: os.stat_result, uid: int, gid: int) -> bool:
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)
