"""device-mapper snapshots: base loop device (shared, read-only) + per-sandbox sparse CoW file.

The table strings are pure functions (unit-tested); the ``dmsetup`` calls need a kernel with
device-mapper (``/dev/mapper/control``), which :meth:`DmSnapshotStrategy.available` checks.
The CoW file is persistent (``P``), so after a pause the same file re-attached under a new dm
device shows the same disk.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from smartvm.sandbox.cow.base import (
    Availability,
    CowDisk,
    CowLayer,
    CowStrategy,
    cow_error,
    need_tool,
    write_flat,
)
from smartvm.sandbox.cow.loopdev import LoopRegistry, sectors

COW_FILE = "rootfs.cow"
CONTROL = Path("/dev/mapper/control")
CHUNK_SECTORS = 8  # 4 KiB chunks: the guest's page-sized writes copy no more than they must
_NAME_OK = re.compile(r"^[A-Za-z0-9_.+-]{1,100}$")


def dm_name(sandbox_id: str) -> str:
    name = f"smartvm-{sandbox_id}"
    if not _NAME_OK.match(name):
        raise cow_error(f"sandbox id {sandbox_id!r} cannot name a device-mapper device")
    return name


def snapshot_table(
    size_sectors: int, origin: str, cow: str, *, persistent: bool = True, chunk_sectors: int = CHUNK_SECTORS
) -> str:
    """``0 <sectors> snapshot <origin> <cow> P|N <chunk>``: one dm-snapshot target over the base."""
    if size_sectors <= 0:
        raise cow_error(f"a snapshot needs a positive size, got {size_sectors} sectors")
    if chunk_sectors <= 0 or chunk_sectors & (chunk_sectors - 1):
        raise cow_error(f"chunk size must be a power of two in sectors, got {chunk_sectors}")
    for dev in (origin, cow):
        if not dev or any(c.isspace() for c in dev):
            raise cow_error(f"device {dev!r} cannot appear in a dm table")
    return f"0 {size_sectors} snapshot {origin} {cow} {'P' if persistent else 'N'} {chunk_sectors}"


def cow_file_bytes(base_bytes: int) -> int:
    """Sparse CoW store big enough for every chunk to change: data + exception metadata + header."""
    return base_bytes + base_bytes // 128 + (1 << 20)


def device_path(sandbox_id: str) -> Path:
    return Path("/dev/mapper") / dm_name(sandbox_id)


def _dmsetup(*args: str, stdin: str | None = None) -> None:
    res = subprocess.run(["dmsetup", *args], input=stdin, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise cow_error(f"dmsetup {args[0]} failed: {res.stderr.strip()}")


class DmDisk(CowDisk):
    def __init__(self, layer: CowLayer, registry: LoopRegistry) -> None:
        super().__init__(layer)
        self.registry = registry
        self.attached = False

    @property
    def device_path(self) -> Path:
        return device_path(self.layer.sandbox_id)

    def attach(self) -> None:
        sid, cow_file = self.layer.sandbox_id, self.layer.paths()[0]
        origin = self.registry.acquire(self.layer.base_image, sid)
        try:
            cow_dev = self.registry.attach_private(cow_file, sid)
            if not self.device_path.exists():  # else: adopt the device a previous manager made
                table = snapshot_table(self.layer.size_bytes // 512, origin, cow_dev)
                _dmsetup("create", dm_name(sid), stdin=table + "\n")
        except BaseException:
            self.registry.detach_private(sid)
            self.registry.release(self.layer.base_image, sid)
            raise
        self.attached = True

    def detach(self) -> None:
        if not self.attached:
            return
        if self.device_path.exists():
            _dmsetup("remove", dm_name(self.layer.sandbox_id))
        self.registry.detach_private(self.layer.sandbox_id)
        self.registry.release(self.layer.base_image, self.layer.sandbox_id)
        self.attached = False

    def flatten(self, dest: Path) -> Path:
        """Copy the dm device block by block, leaving all-zero chunks as holes. Needs the disk
        attached (after ``persist``, ``reopen`` it first)."""
        if not self.attached:
            raise cow_error(f"the disk of {self.layer.sandbox_id} is not attached: reopen it to flatten")
        chunk = 1 << 20

        def copy_sparse(tmp: Path) -> None:
            with open(self.device_path, "rb") as src, open(tmp, "wb") as out:
                size = sectors(self.device_path) * 512
                pos = 0
                while pos < size:
                    data = src.read(min(chunk, size - pos))
                    if not data:
                        break
                    if data.count(0) != len(data):
                        os.pwrite(out.fileno(), data, pos)
                    pos += len(data)
                out.truncate(size)

        return write_flat(dest, copy_sparse)


class DmSnapshotStrategy(CowStrategy):
    name = "dm-snapshot"
    holds_host_devices = True

    def __init__(self, registry: LoopRegistry) -> None:
        self.registry = registry

    def available(self) -> Availability:
        if not CONTROL.exists():
            return Availability(False, f"the kernel has no device-mapper ({CONTROL} is missing)")
        if need_tool("dmsetup") is None or need_tool("losetup") is None:
            return Availability(False, "dmsetup or losetup is missing (apt-get install dmsetup mount)")
        if os.geteuid() != 0:
            return Availability(False, "device-mapper needs root")
        return Availability(True)

    def create(self, base_image: Path, sandbox_dir: Path, sandbox_id: str) -> CowDisk:
        sandbox_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        size = sectors(base_image) * 512
        cow_file = sandbox_dir / COW_FILE
        with open(cow_file, "xb") as f:
            f.truncate(cow_file_bytes(size))
        disk = DmDisk(
            CowLayer("dm-snapshot", sandbox_id, base_image, sandbox_dir, (COW_FILE,), size), self.registry
        )
        try:
            disk.attach()
        except BaseException:
            cow_file.unlink(missing_ok=True)
            raise
        return disk

    def reopen(self, layer: CowLayer) -> CowDisk:
        """Attach a persisted layer, or adopt it when its dm device survived a manager restart."""
        if not layer.paths()[0].is_file():
            raise cow_error(f"the CoW file {layer.paths()[0]} of {layer.sandbox_id} is missing")
        disk = DmDisk(layer, self.registry)
        disk.attach()
        return disk
