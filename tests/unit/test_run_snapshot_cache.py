"""The run-snapshot cache without a guest: the seal finds damage, eviction is bounded and spares entries
in use, the cache lock can be waited for and cancelled, layers stay in the VM's runtime dir."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from smartvm.config import MicroVMConfig
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.build_steps import cache_lock
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM
from smartvm.sandbox.cow import Availability, choose_strategy, strategies
from smartvm.sandbox.run_snapshots import KEEP, check_entry, ensure_run_snapshot, evict, locked_cache, seal
from smartvm.sandbox.templates import BuiltTemplate, TemplateSpec
from smartvm.snapshot import Snapshot
from smartvm.vm import _with_layers


def make_entry(directory: Path, mtime: float | None = None) -> Path:
    """A sealed entry with the files of a real one (small stand-ins for disk, memory and state)."""
    snap = directory / "snapshot"
    snap.mkdir(parents=True)
    (directory / "disk.img").write_bytes(b"\0" * 8192)
    (snap / "memory").write_bytes(b"\1" * 8192)
    (snap / "vm.state").write_bytes(b"QEVM\0\0\0\3" + b"\2" * 4096)
    Snapshot(snap, "qemu", "Full", "vm.state", "memory", {}).save()
    seal(BuiltTemplate("run", directory))
    if mtime is not None:
        os.utime(directory, (mtime, mtime))
    return directory


def _keep_mtime(path: Path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda e: os.truncate(e / "snapshot" / "memory", 100), "snapshot/memory"),
        (lambda e: (e / "disk.img").unlink(), "disk.img"),
        (lambda e: (e / "snapshot" / "snapshot.json").write_text("{"), "snapshot/snapshot.json"),
        (lambda e: _keep_mtime(e / "snapshot" / "vm.state", b"QEVM\0\0\0\3" + b"\3" * 4096), "vm.state"),
        (lambda e: (e / "snapshot" / "extra").write_text("x"), "snapshot/extra"),
        (lambda e: (e / "seal.json").write_text("[]"), "seal is malformed"),
        (lambda e: (e / "seal.json").unlink(), "no seal"),
    ],
)
def test_the_seal_finds_damage(tmp_path: Path, damage: object, named: str) -> None:
    entry = make_entry(tmp_path / "k")
    assert check_entry(entry).template.directory == entry
    damage(entry)  # type: ignore[operator]
    with pytest.raises(SmartVMError) as info:
        check_entry(entry)
    assert info.value.code is ErrorCode.SNAPSHOT_INVALID and named in info.value.message


def test_eviction_keeps_the_most_recent_the_current_and_those_in_use(tmp_path: Path) -> None:
    entries = [make_entry(tmp_path / f"e{i}", mtime=1000 + i) for i in range(KEEP + 3)]
    current, in_use = entries[0], entries[1]  # the two least recently used
    with open(in_use / "snapshot" / "memory", "rb"):  # as a VM restored from it holds it
        removed = evict(tmp_path, current=current)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted([current.name, in_use.name] + [e.name for e in entries[-(KEEP - 1) :]])
    assert sorted(removed) == sorted(set(entries) - {current, in_use, *entries[-(KEEP - 1) :]})


def test_a_held_cache_lock_fails_at_once_without_wait(tmp_path: Path) -> None:
    with cache_lock("x", tmp_path), pytest.raises(BlockingIOError), cache_lock("x", tmp_path, wait=False):
        pass
    with cache_lock("x", tmp_path, wait=False):
        pass


async def test_waiting_for_the_cache_lock_can_be_cancelled(tmp_path: Path) -> None:
    with cache_lock("run-snapshots", tmp_path):

        async def wait() -> None:
            async with locked_cache(tmp_path):
                raise AssertionError("got a lock another holder has")

        task = asyncio.create_task(wait())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)
    async with locked_cache(tmp_path):  # free again
        pass


def test_files_only_never_picks_device_mapper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import smartvm.sandbox.cow as cow

    real = cow.strategies

    def dm_available(engine: str, directory: Path, registry: object = None) -> list[object]:
        out = real(engine, directory)
        monkeypatch.setattr(out[0], "available", lambda: Availability(True))
        return out  # type: ignore[return-value]

    monkeypatch.setattr(cow, "strategies", dm_available)
    assert choose_strategy("qemu", tmp_path).name == "dm-snapshot"
    assert not choose_strategy("qemu", tmp_path, files_only=True).holds_host_devices
    assert [s.name for s in strategies("qemu", tmp_path) if s.holds_host_devices] == ["dm-snapshot"]


def test_a_layer_outside_the_runtime_dir_is_refused(tmp_path: Path) -> None:
    config = MicroVMConfig.model_validate(
        {
            "boot_source": {"kernel_image_path": "/k"},
            "drives": [{"drive_id": "rootfs", "path_on_host": "/base", "is_root_device": True}],
        }
    )
    inside = _with_layers(config, tmp_path, {"rootfs": lambda d: d / "disk" / "l.qcow2"})
    [drive] = inside.drives
    assert drive.path_on_host == str(tmp_path / "disk" / "l.qcow2") and drive.ephemeral is False
    with pytest.raises(SmartVMError, match="outside the VM's runtime dir"):
        _with_layers(config, tmp_path, {"rootfs": lambda d: d / ".." / "escaped"})


async def test_an_unwritable_cache_is_a_clear_error(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    for name in ("vmlinux", "rootfs.ext4"):
        (tmp_path / name).write_bytes(b"x")
    spec = TemplateSpec("run", kernel=tmp_path / "vmlinux", rootfs=tmp_path / "rootfs.ext4", boot_args="")
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache directory should be")
    svm = SmartVM(SmartVMOptions(engine="qemu", runtime_dir=tmp_path / "rt", data_dir=tmp_path / "data"))
    with pytest.raises(SmartVMError) as info:
        await ensure_run_snapshot(spec, svm=svm, ready_timeout=5, cache=cache)
    assert info.value.code is ErrorCode.TEMPLATE_BUILD_FAILED
    assert "SMARTVM_CACHE_DIR" in info.value.message and "--cold" in info.value.message
