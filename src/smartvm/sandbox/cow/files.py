"""File-copy strategies: a reflink clone (shares every block until written) or a sparse copy.

On btrfs/xfs ``st_blocks`` of a reflinked file counts the blocks it shares with the base, so the
reflink disk reports only the blocks FIEMAP says are not shared: what this sandbox really costs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import tempfile
from pathlib import Path

from smartvm.errors import SmartVMError
from smartvm.host.storage import FICLONE, clone_file
from smartvm.sandbox.cow.base import (
    Availability,
    CowDisk,
    CowLayer,
    CowStrategy,
    StrategyName,
    cow_error,
    write_flat,
)

LAYER_FILE = "rootfs.img"
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENT_SHARED = 0x2000
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQQQI3I")  # logical, physical, length, reserved64[2], flags, reserved[3]


def unshared_bytes(path: Path, batch: int = 256) -> int:
    """Bytes of ``path``'s extents not shared with another file (FIEMAP); st_blocks if unsupported."""
    total, start = 0, 0
    with open(path, "rb") as f:
        while True:
            buf = bytearray(_HEADER.pack(start, (1 << 64) - 1 - start, _FIEMAP_FLAG_SYNC, 0, batch, 0))
            buf += bytes(_EXTENT.size * batch)
            try:
                fcntl.ioctl(f.fileno(), _FS_IOC_FIEMAP, buf)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                    return os.fstat(f.fileno()).st_blocks * 512
                raise
            mapped = _HEADER.unpack_from(buf)[3]
            if mapped == 0:
                return total
            for i in range(mapped):
                logical, _, length, _, _, flags, *_ = _EXTENT.unpack_from(
                    buf, _HEADER.size + i * _EXTENT.size
                )
                if not flags & _FIEMAP_EXTENT_SHARED:
                    total += length
                start = logical + length
                if flags & _FIEMAP_EXTENT_LAST:
                    return total


class FileCopyDisk(CowDisk):
    """A private copy of the base in one file; flatten is a copy of that file."""

    @property
    def device_path(self) -> Path:
        return self.layer.paths()[0]

    def allocated_bytes(self) -> int:
        path = self.device_path
        if not path.exists():
            return 0
        if self.layer.strategy == "reflink":
            return unshared_bytes(path)
        return super().allocated_bytes()

    def flatten(self, dest: Path) -> Path:
        return write_flat(dest, lambda tmp: clone_file(self.device_path, tmp))


def reflink_supported(directory: Path) -> Availability:
    """Try FICLONE between two scratch files in ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory) as a, tempfile.TemporaryFile(dir=directory) as b:
            a.write(b"x" * 4096)
            a.flush()
            fcntl.ioctl(b.fileno(), FICLONE, a.fileno())
    except OSError as exc:
        return Availability(False, f"{directory} does not support reflinks ({exc.strerror})")
    return Availability(True)


class FileCopyStrategy(CowStrategy):
    def __init__(self, name: StrategyName, directory: Path) -> None:
        self.name = name
        self.directory = directory

    def available(self) -> Availability:
        return reflink_supported(self.directory) if self.name == "reflink" else Availability(True)

    def create(self, base_image: Path, sandbox_dir: Path, sandbox_id: str) -> CowDisk:
        sandbox_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        dst = sandbox_dir / LAYER_FILE
        try:
            method = clone_file(base_image, dst)
        except SmartVMError as exc:
            raise cow_error(f"cannot create the root disk of {sandbox_id}: {exc.message}") from exc
        if self.name == "reflink" and method != "reflink":
            dst.unlink(missing_ok=True)
            raise cow_error(f"{sandbox_dir} does not support reflinks: use the sparse-copy strategy")
        layer = CowLayer(
            self.name, sandbox_id, base_image, sandbox_dir, (LAYER_FILE,), base_image.stat().st_size
        )
        return FileCopyDisk(layer)

    def reopen(self, layer: CowLayer) -> CowDisk:
        if not layer.paths()[0].is_file():
            raise cow_error(f"the disk layer {layer.paths()[0]} of {layer.sandbox_id} is missing")
        return FileCopyDisk(layer)
