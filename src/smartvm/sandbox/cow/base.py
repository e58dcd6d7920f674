"""The copy-on-write disk contract every strategy implements, and helpers they share.

A sandbox's root disk is a shared read-only base image plus a private layer of changes. The
manager needs four things from a layer: a path the hypervisor opens, its real size on disk, a
standalone image of base + changes (for snapshots), and a way to keep it across a pause: the VM is
destroyed, :meth:`CowDisk.persist` detaches host devices and moves the layer files into the pause
dir, and :meth:`CowStrategy.reopen` attaches them again later with the same contents.
"""

from __future__ import annotations

import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from smartvm.errors import ErrorCode, SmartVMError

DiskFormat = Literal["raw", "qcow2"]
StrategyName = Literal["dm-snapshot", "reflink", "qcow2", "sparse-copy"]


@dataclass(frozen=True)
class Availability:
    """Whether a strategy can run here; ``reason`` says why not (empty when it can)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class CowLayer:
    """A serialisable reference to a layer on disk: what the store keeps and ``reopen`` takes."""

    strategy: StrategyName
    sandbox_id: str
    base_image: Path
    layer_dir: Path
    files: tuple[str, ...]  # names inside layer_dir, the first is the main layer file
    size_bytes: int  # the guest-visible disk size
    extra: dict[str, str] = field(default_factory=dict)

    def paths(self) -> list[Path]:
        return [self.layer_dir / name for name in self.files]

    def to_json(self) -> str:
        d = asdict(self)
        d["base_image"], d["layer_dir"], d["files"] = (
            str(self.base_image),
            str(self.layer_dir),
            list(self.files),
        )
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CowLayer:
        d = json.loads(text)
        return cls(
            strategy=d["strategy"],
            sandbox_id=d["sandbox_id"],
            base_image=Path(d["base_image"]),
            layer_dir=Path(d["layer_dir"]),
            files=tuple(d["files"]),
            size_bytes=int(d["size_bytes"]),
            extra=dict(d.get("extra") or {}),
        )


class CowDisk(ABC):
    """One sandbox's root disk. Not thread-safe; the manager owns it."""

    def __init__(self, layer: CowLayer) -> None:
        self.layer = layer
        self.released = False

    @property
    @abstractmethod
    def device_path(self) -> Path:
        """What the hypervisor opens (a file or a block device)."""

    @property
    def disk_format(self) -> DiskFormat:
        return "raw"

    def allocated_bytes(self) -> int:
        """Real disk usage of the files this disk owns (``st_blocks * 512``, never apparent size)."""
        return sum(allocated(p) for p in self.layer.paths() if p.exists())

    @abstractmethod
    def flatten(self, dest: Path) -> Path:
        """Write base + changes to ``dest`` as a standalone raw image (atomically)."""

    def detach(self) -> None:
        """Release host resources (loop/dm devices) but keep the layer files. Idempotent."""
        return None  # file-backed layers hold no host devices

    def persist(self, pause_dir: Path) -> CowLayer:
        """Detach and move the layer files into ``pause_dir``; returns the layer to ``reopen`` later.

        The VM using this disk must already be gone. After this the object is spent.
        """
        self.detach()
        pause_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for src in self.layer.paths():
            move_file(src, pause_dir / src.name)
        self.released = True
        self.layer = replace(self.layer, layer_dir=pause_dir)
        return self.layer

    def release(self) -> None:
        """Detach and delete the layer files. Idempotent, and a no-op on a disk already persisted
        (its files belong to the pause dir now); the base image is never touched."""
        if self.released:
            return
        self.detach()
        for path in self.layer.paths():
            path.unlink(missing_ok=True)
        self.released = True


class CowStrategy(ABC):
    name: StrategyName
    # a layer that holds host devices (loop, device-mapper) outlives the removal of its directory
    holds_host_devices: bool = False

    @abstractmethod
    def available(self) -> Availability:
        """Whether this strategy works for the configured engine and directory."""

    @abstractmethod
    def create(self, base_image: Path, sandbox_dir: Path, sandbox_id: str) -> CowDisk:
        """A fresh layer over ``base_image`` in ``sandbox_dir``; ``base_image`` is only read."""

    @abstractmethod
    def reopen(self, layer: CowLayer) -> CowDisk:
        """Attach a layer persisted by :meth:`CowDisk.persist`, or adopt one recorded before a
        manager restart whose VM still runs (host devices that still exist are reused)."""


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def cow_error(message: str) -> SmartVMError:
    return SmartVMError(ErrorCode.COW_FAILED, message)


def move_file(src: Path, dst: Path) -> None:
    """Rename, or copy sparse-aware + unlink across filesystems (holes stay holes)."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV
            raise cow_error(f"cannot move {src} to {dst}: {exc.strerror}") from exc
        from smartvm.host.storage import clone_file

        write_flat(dst, lambda tmp: clone_file(src, tmp))
        src.unlink()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: Path, dest: Path) -> Path:
    """fsync ``tmp``, rename it onto ``dest`` and fsync the directory: all or nothing."""
    fsync_file(tmp)
    os.replace(tmp, dest)
    dfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return dest


def write_flat(dest: Path, fill: Callable[[Path], object]) -> Path:
    """``fill(tmp)`` writes a standalone image into a temp file beside ``dest``, which then replaces
    ``dest`` all at once (:func:`commit_file`); the temp file is removed when anything fails."""
    tmp = temp_beside(dest)
    try:
        fill(tmp)
        return commit_file(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_beside(dest: Path) -> Path:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    tmp.unlink(missing_ok=True)
    return tmp


def need_tool(tool: str) -> str | None:
    return shutil.which(tool)
