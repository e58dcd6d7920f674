"""Copy-on-write disks for real: sparse copy, reflink on a loop-mounted btrfs, qcow2 via qemu-img,
dm-snapshot where the kernel has device-mapper. Each writes into two disks over one base and checks
the base is unchanged, the disks are independent, flatten = base + changes, pause/reopen keeps them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.cow import CowDisk, CowStrategy, LoopRegistry
from smartvm.sandbox.cow.dm import CONTROL, DmSnapshotStrategy
from smartvm.sandbox.cow.files import FileCopyStrategy
from smartvm.sandbox.cow.loopdev import attached_loops, detach_loop
from smartvm.sandbox.cow.qcow2 import Qcow2Strategy

MIB = 1 << 20
BASE_SIZE = 256 * MIB


def make_base(path: Path) -> Path:
    """A 256 MiB sparse raw image with 2 MiB of data at 0 and a marker at 100 MiB."""
    with open(path, "wb") as f:
        f.truncate(BASE_SIZE)
        f.write(os.urandom(2 * MIB))
        f.seek(100 * MIB)
        f.write(b"BASE-MARKER")
    return path


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def write_at(disk: CowDisk, offset: int, data: bytes) -> None:
    if disk.disk_format == "qcow2":
        hexbyte = data[0]
        assert data == bytes([hexbyte]) * len(data)
        subprocess.run(
            [
                "qemu-io",
                "-f",
                "qcow2",
                "-c",
                f"write -P {hexbyte} {offset} {len(data)}",
                str(disk.device_path),
            ],
            check=True,
            capture_output=True,
        )
        return
    fd = os.open(disk.device_path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(image: Path, offset: int, n: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(n)


def exercise(strategy: CowStrategy, base: Path, work: Path, *, small: bool) -> None:
    before = sha(base)
    a = strategy.create(base, work / "sb-aaaaaaaa", "sb-aaaaaaaa")
    b = strategy.create(base, work / "sb-bbbbbbbb", "sb-bbbbbbbb")
    try:
        if small:
            assert a.allocated_bytes() < 5 * MIB, a.allocated_bytes()
        write_at(a, 100 * MIB, b"\xaa" * 65536)
        write_at(b, 4 * MIB, b"\xbb" * 65536)
        assert sha(base) == before
        flat_a = a.flatten(work / "a.img")
        flat_b = b.flatten(work / "b.img")
        assert flat_a.stat().st_size == BASE_SIZE == flat_b.stat().st_size
        assert read_at(flat_a, 100 * MIB, 65536) == b"\xaa" * 65536
        assert read_at(flat_a, 4 * MIB, 16) == bytes(16)  # b's write is not in a
        assert read_at(flat_b, 4 * MIB, 65536) == b"\xbb" * 65536
        assert read_at(flat_b, 100 * MIB, 11) == b"BASE-MARKER"
        assert read_at(flat_a, 0, 2 * MIB) == read_at(base, 0, 2 * MIB)
        assert flat_a.stat().st_blocks * 512 < 16 * MIB  # holes stay holes
        assert not list(work.glob(".*.part"))

        # pause: the layer moves to the pause dir, the disk comes back with a's change in it
        layer = a.persist(work / "pause-a")
        assert all(p.parent == work / "pause-a" and p.exists() for p in layer.paths())
        assert not (work / "sb-aaaaaaaa" / layer.files[0]).exists()
        a.release()  # a persisted disk is spent: releasing it must not delete the paused layer
        assert all(p.exists() for p in layer.paths())
        a = strategy.reopen(layer)
        flat_again = a.flatten(work / "a2.img")
        assert sha(flat_again) == sha(flat_a)
        assert sha(base) == before
    finally:
        a.release()
        b.release()
        a.release()  # idempotent
    assert not any(p.exists() for p in a.layer.paths() + b.layer.paths())
    assert sha(base) == before


def test_sparse_copy(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.img")
    exercise(FileCopyStrategy("sparse-copy", tmp_path), base, tmp_path, small=False)


def test_qcow2_overlay(tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-img/qemu-io missing (apt-get install qemu-utils)")
    strategy = Qcow2Strategy("qemu")
    assert strategy.available()
    assert not Qcow2Strategy("firecracker").available()
    base = make_base(tmp_path / "base.img")
    exercise(strategy, base, tmp_path, small=True)
    sized = strategy.create(base, tmp_path / "sized", "sized")  # the guest sees the base's size
    assert sized.layer.size_bytes == base.stat().st_size == int(
        json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(sized.device_path)],
                                  capture_output=True, check=True).stdout)["virtual-size"]
    )  # fmt: skip
    sized.release()


@pytest.fixture(params=["btrfs", "xfs"])
def reflink_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A btrfs or xfs made on a loop device in a temp dir; unmounted and detached even on failure."""
    fstype = str(request.param)
    mkfs = {"btrfs": ["mkfs.btrfs", "-q"], "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"]}[fstype]
    if os.geteuid() != 0 or shutil.which(mkfs[0]) is None:
        pytest.skip(f"needs root and {mkfs[0]} (apt-get install btrfs-progs xfsprogs)")
    top = Path(tempfile.mkdtemp(prefix="svcow"))
    image, mnt = top / "fs.img", top / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(768 * MIB)
    mounted = False
    try:
        subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
        res = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot loop-mount {fstype} here: {res.stderr.strip()}")
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
        for dev, backing in attached_loops().items():
            if backing == image:
                detach_loop(dev)
        shutil.rmtree(top)


def test_reflink(reflink_dir: Path) -> None:
    strategy = FileCopyStrategy("reflink", reflink_dir)
    assert strategy.available()
    base = make_base(reflink_dir / "base.img")
    exercise(strategy, base, reflink_dir, small=True)


def test_reflink_refused_where_unsupported(tmp_path: Path) -> None:
    strategy = FileCopyStrategy("reflink", tmp_path)
    if strategy.available():
        pytest.skip(f"{tmp_path} supports reflinks")
    with pytest.raises(SmartVMError) as err:
        strategy.create(make_base(tmp_path / "base.img"), tmp_path / "sb", "sb-00000001")
    assert err.value.code == ErrorCode.COW_FAILED
    assert not (tmp_path / "sb" / "rootfs.img").exists()


def test_dm_snapshot(tmp_path: Path) -> None:
    if not CONTROL.exists():
        pytest.skip(f"the kernel has no device-mapper ({CONTROL} is missing)")
    registry = LoopRegistry(tmp_path / "loops", owned_roots=[tmp_path])
    strategy = DmSnapshotStrategy(registry)
    status = strategy.available()
    if not status:
        pytest.skip(status.reason)
    base = make_base(tmp_path / "base.img")
    exercise(strategy, base, tmp_path, small=True)
    assert registry.holders(base) == []
