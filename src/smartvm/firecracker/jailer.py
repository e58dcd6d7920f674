"""Opt-in jailer support: the jail layout, the jailer command line, and moving resources into the jail.

The jailer chroots Firecracker into ``<chroot_base>/<exec file name>/<id>/root``, drops to ``uid``/``gid``,
joins a network namespace and cgroups, then execs Firecracker. Everything Firecracker opens (kernel,
drives, sockets) must therefore live inside that root: :meth:`Jail.link_in` hard-links a file there
(or copies it, copy-on-write, when the jail is on another filesystem) and returns the path Firecracker
sees. :meth:`Jail.cleanup` removes the whole jail directory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.storage import clone_file

log = logging.getLogger(__name__)

DEFAULT_CHROOT_BASE = Path("/srv/jailer")
API_SOCKET_IN_JAIL = "/run/firecracker.socket"
_JAIL_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # what the jailer accepts for --id
_CGROUP = re.compile(r"^[a-z0-9_]+\.[a-z0-9_.]+$")


@dataclass(frozen=True)
class JailerConfig:
    """How to jail one Firecracker process (names follow the jailer's flags)."""

    jailer_binary: Path
    firecracker_binary: Path
    vm_id: str
    uid: int
    gid: int
    chroot_base_dir: Path = DEFAULT_CHROOT_BASE
    netns: str | None = None  # a name under /var/run/netns, or an absolute path
    cgroups: Mapping[str, str] = field(default_factory=dict)  # e.g. {"cpu.max": "50000 100000"}
    cgroup_version: int | None = None  # 1 or 2
    parent_cgroup: str | None = None
    resource_limits: Mapping[str, int] = field(default_factory=dict)  # e.g. {"no-file": 1024}
    daemonize: bool = False
    new_pid_ns: bool = False

    def __post_init__(self) -> None:
        if not _JAIL_ID.match(self.vm_id):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"jailer id {self.vm_id!r} must be 1-64 letters, digits or '-' (the jailer refuses others)",
            )
        for key in self.cgroups:
            if not _CGROUP.match(key):
                raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"cgroup key {key!r} must look like 'cpu.max'")
        if self.cgroup_version not in (None, 1, 2):
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "cgroup_version must be 1 or 2")
        if self.uid < 0 or self.gid < 0:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "uid and gid must be non-negative")


class Jail:
    """The jail directory of one VM and the jailer command that uses it."""

    def __init__(self, config: JailerConfig) -> None:
        self.config = config

    @property
    def jail_dir(self) -> Path:
        return self.config.chroot_base_dir / self.config.firecracker_binary.name / self.config.vm_id

    @property
    def root(self) -> Path:
        return self.jail_dir / "root"

    @property
    def api_socket(self) -> Path:
        """Firecracker's API socket as seen from the host."""
        return self.host_path(API_SOCKET_IN_JAIL)

    @property
    def pid_file(self) -> Path:
        """Where a daemonized jailer writes Firecracker's pid."""
        return self.root / f"{self.config.firecracker_binary.name}.pid"

    def host_path(self, jail_path: str) -> Path:
        """The host path of ``jail_path`` (a path inside the chroot), refused if it would escape."""
        parts = PurePosixPath("/", jail_path).parts[1:]
        if not parts or ".." in parts:
            raise SmartVMError(ErrorCode.UNSAFE_PATH, f"{jail_path!r} is not a path inside the jail")
        return self.root.joinpath(*parts)

    def argv(self, firecracker_args: Sequence[str]) -> list[str]:
        """The jailer command line; ``firecracker_args`` go to Firecracker (after ``--``)."""
        c = self.config
        args = [
            str(c.jailer_binary),
            "--id",
            c.vm_id,
            "--exec-file",
            str(c.firecracker_binary),
            "--uid",
            str(c.uid),
            "--gid",
            str(c.gid),
            "--chroot-base-dir",
            str(c.chroot_base_dir),
        ]
        if c.netns:
            args += ["--netns", c.netns if c.netns.startswith("/") else f"/var/run/netns/{c.netns}"]
        if c.cgroup_version is not None:
            args += ["--cgroup-version", str(c.cgroup_version)]
        if c.parent_cgroup:
            args += ["--parent-cgroup", c.parent_cgroup]
        for key, value in c.cgroups.items():
            args += ["--cgroup", f"{key}={value}"]
        for key, limit in c.resource_limits.items():
            args += ["--resource-limit", f"{key}={limit}"]
        if c.daemonize:
            args.append("--daemonize")
        if c.new_pid_ns:
            args.append("--new-pid-ns")
        return [*args, "--", *firecracker_args]

    def prepare(self) -> None:
        """Create the jail root (and ``/run`` for the API socket); a leftover jail is an error."""
        if self.jail_dir.exists():
            raise SmartVMError(
                ErrorCode.JAILER_FAILED,
                f"jail {self.jail_dir} already exists: another VM uses id {self.config.vm_id!r} "
                "or an earlier one was not cleaned up; remove the directory",
            )
        (self.root / "run").mkdir(parents=True, mode=0o755)
        os.chown(self.root / "run", self.config.uid, self.config.gid)

    def link_in(
        self,
        source: str | os.PathLike[str],
        name: str | None = None,
        *,
        writable: bool = False,
        allow_copy: bool = True,
    ) -> str:
        """Put ``source`` into the jail root as ``name``; returns its path inside the jail.

        Hard-linked when possible (no copy), else copied copy-on-write; ``allow_copy=False`` refuses
        the copy (for files whose writes must reach ``source``). Writable files are handed to the
        jail's uid/gid: for a hard link that is the source's inode, so the source changes owner too.
        """
        src = Path(source)
        target = self.host_path(name or src.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, target)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise SmartVMError(
                    ErrorCode.JAILER_FAILED, f"cannot link {src} into the jail: {exc.strerror}"
                ) from exc
            if not allow_copy:
                raise SmartVMError(
                    ErrorCode.JAILER_FAILED,
                    f"cannot hard-link {src} into the jail {self.root} ({exc.strerror}) and a copy would "
                    "not see Firecracker's writes; put it on the filesystem of chroot_base_dir",
                ) from exc
            clone_file(src, target)
        if writable:
            os.chown(target, self.config.uid, self.config.gid)
        return self.jail_path(target)

    def jail_path(self, host_path: Path) -> str:
        """The path Firecracker sees for ``host_path`` (a path under the jail root)."""
        return "/" + host_path.relative_to(self.root).as_posix()

    def make_dir(self, jail_path: str) -> Path:
        """``mkdir -p`` inside the jail; directories it creates belong to the jail's uid/gid."""
        target = self.host_path(jail_path)
        missing = [d for d in [target, *target.parents] if d != self.root and self.root in d.parents]
        for directory in reversed(missing):
            if not directory.exists():
                directory.mkdir(mode=0o755)
                os.chown(directory, self.config.uid, self.config.gid)
        return target

    def cleanup(self) -> None:
        """Remove the jail directory (and the per-binary directory when it is empty). Idempotent.

        A jail with something mounted inside it (in our mount namespace) is left alone with a warning:
        ``rmtree`` would delete the mounted files too.
        """
        mounted = mounts_under(self.jail_dir)
        if mounted:
            log.warning("not removing jail %s: still mounted there: %s", self.jail_dir, ", ".join(mounted))
            return
        shutil.rmtree(self.jail_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.jail_dir.parent.rmdir()


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory`` in this process's mount namespace."""
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f if len(line.split()) > 4]
    except OSError:
        return []
    top = str(directory).rstrip("/")
    # mountinfo escapes space, tab, newline and backslash as octal
    decoded = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), p) for p in points]
    return [p for p in decoded if p == top or p.startswith(top + "/")]
