"""Drive staging: copy-on-write copies that never write the source and never fill holes."""

import os
from pathlib import Path

import pytest

from error_support import raises_code
from smartvm import BootSource, Drive, MicroVMConfig, SmartVMError
from smartvm.errors import ErrorCode
from smartvm.host.runtime import VMRuntime, sanitize_id
from smartvm.host.storage import allocated_bytes, clone_file

GiB = 1 << 30


def _sparse_image(path: Path, size: int = GiB, data_at: tuple[int, ...] = (0, 300 << 20, 900 << 20)) -> bytes:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in data_at:
            f.seek(off)
            f.write(chunk)
    return chunk


def test_sparse_1gib_image_stages_without_allocating_holes(tmp_path: Path) -> None:
    src = tmp_path / "rootfs.ext4"
    chunk = _sparse_image(src)
    src_mtime = src.stat().st_mtime_ns
    runtime_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    rt = VMRuntime.create(runtime_root / f"smartvm-test-{os.getpid()}", "vm-stage")
    try:
        staged = rt.stage_drive(Drive(drive_id="rootfs", path_on_host=str(src), is_root_device=True))
        assert staged.stat().st_size == GiB
        assert allocated_bytes(staged) < 16 << 20, "holes were filled"
        with open(staged, "rb") as f:
            f.seek(300 << 20)
            assert f.read(1 << 20) == chunk
            f.seek(500 << 20)
            assert f.read(4096) == b"\0" * 4096
        assert src.stat().st_mtime_ns == src_mtime
    finally:
        rt.remove()
        rt.dir.parent.rmdir()
    assert not rt.dir.exists()


def test_stage_drives_policy(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(b"x" * 4096)
    cfg = MicroVMConfig(
        boot_source=BootSource(kernel_image_path="/k"),
        drives=[
            Drive(drive_id="rw", path_on_host=str(img)),
            Drive(drive_id="ro", path_on_host=str(img), is_read_only=True),
            Drive(drive_id="keep", path_on_host=str(img), ephemeral=False),
            Drive(drive_id="ro_eph", path_on_host=str(img), is_read_only=True, ephemeral=True),
        ],
    )
    rt = VMRuntime.create(tmp_path / "rt", "vm1")
    staged = {d.drive_id: d.path_on_host for d in rt.stage_drives(cfg, ephemeral_writable=True).drives}
    assert staged["ro"] == staged["keep"] == str(img)
    assert staged["rw"].startswith(str(rt.dir)) and staged["ro_eph"].startswith(str(rt.dir))
    rt.remove()
    rt2 = VMRuntime.create(tmp_path / "rt", "vm2")
    off = {d.drive_id: d.path_on_host for d in rt2.stage_drives(cfg, ephemeral_writable=False).drives}
    assert off["rw"] == str(img) and off["ro_eph"].startswith(str(rt2.dir))
    rt2.remove()


def test_missing_image_is_a_clear_error(tmp_path: Path) -> None:
    rt = VMRuntime.create(tmp_path, "vm")
    with pytest.raises(SmartVMError) as exc:
        rt.stage_drive(Drive(drive_id="d", path_on_host=str(tmp_path / "nope.img")))
    assert exc.value.code is ErrorCode.STAGING_FAILED


def test_clone_refuses_existing_target_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.write_bytes(b"data")
    dst = tmp_path / "d"
    dst.write_bytes(b"old")
    with raises_code(ErrorCode.STAGING_FAILED):
        clone_file(src, dst)
    assert dst.read_bytes() == b"old"
    with raises_code(ErrorCode.STAGING_FAILED):
        clone_file(tmp_path / "missing", tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_duplicate_runtime_dir_and_sanitizing(tmp_path: Path) -> None:
    VMRuntime.create(tmp_path, "same")
    with pytest.raises(SmartVMError) as exc:
        VMRuntime.create(tmp_path, "same")
    assert exc.value.code is ErrorCode.DUPLICATE_VM_ID
    assert sanitize_id("../a b") == "_a_b"
