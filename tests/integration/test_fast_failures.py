"""Failures that used to hang until a timeout (300 s, 60 s, 30 s) now fail within seconds and say why:
damaged snapshot files are refused before QEMU starts, and a QEMU that dies while the guest agent is
awaited ends the wait at once (a full runtime tmpfs is named as the cause of its SIGBUS)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_support import assert_nothing_left, boot_config

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.options import SmartVMOptions

pytestmark = pytest.mark.integration

FAST_S = 15.0  # generous for a loaded machine; the old code took 30-300 s


async def _snapshot(svm: Any, guest_image: Any, tmp_path: Path) -> Path:
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    await vm.wait_ready(120)
    snapdir = tmp_path / "snap"
    await vm.create_snapshot(snapdir / "vm.state", snapdir / "vm.mem", pause_vm=True)
    await vm.kill()
    return snapdir


@pytest.fixture
async def shm_svm(tmp_path: Path) -> AsyncIterator[Any]:
    """A SmartVM whose runtime root is on tmpfs: QEMU keeps guest RAM in a file, snapshots have vm.mem."""
    from smartvm.orchestrator import SmartVM

    root = Path(tempfile.mkdtemp(prefix="svh2", dir="/dev/shm"))
    svm = SmartVM(SmartVMOptions(engine="qemu", runtime_dir=root, data_dir=tmp_path / "data"))
    try:
        yield svm
    finally:
        for vm in svm.list_vms():
            await vm.kill()
        assert_nothing_left(root)
        shutil.rmtree(root, ignore_errors=True)


def _fill_with_garbage(path: Path) -> None:
    with open(path, "r+b") as f:  # same size, every page garbage
        for _ in range(path.stat().st_size >> 20):
            f.write(os.urandom(1 << 20))


async def _cleaned_up(root: Path) -> None:
    """Nothing left under ``root`` once the VM's watcher has cleaned up (it polls every 0.25 s)."""
    deadline = time.monotonic() + 5
    while os.listdir(root) and time.monotonic() < deadline:  # noqa: ASYNC110 - no event to wait on
        await asyncio.sleep(0.05)
    assert_nothing_left(root)


async def _restore_fails(svm: Any, snapdir: Path) -> SmartVMError:
    t0 = time.monotonic()
    with pytest.raises(SmartVMError) as err:
        clone = await svm.restore_vm(snapdir, vm_id="clone")
        await clone.exec("true", ready_timeout=60)
    assert time.monotonic() - t0 < FAST_S, f"took {time.monotonic() - t0:.0f}s: {err.value}"
    await _cleaned_up(svm.options.runtime_dir)
    return err.value


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"", "is empty"), (b"not a QEMU migration stream" * 10, "does not start with")],
)
async def test_damaged_state_file_is_refused_at_once(
    svm: Any, guest_image: Any, tmp_path: Path, content: bytes, words: str
) -> None:
    snapdir = await _snapshot(svm, guest_image, tmp_path)
    (snapdir / "vm.state").write_bytes(content)
    err = await _restore_fails(svm, snapdir)
    assert err.code == ErrorCode.SNAPSHOT_INVALID and words in err.message, err


async def test_memory_file_of_wrong_size_is_refused_at_once(
    shm_svm: Any, guest_image: Any, tmp_path: Path
) -> None:
    snapdir = await _snapshot(shm_svm, guest_image, tmp_path)
    os.truncate(snapdir / "vm.mem", 100 << 20)
    err = await _restore_fails(shm_svm, snapdir)
    assert err.code == ErrorCode.SNAPSHOT_INVALID, err
    assert f"{100 << 20} bytes but the VM's memory is {256 << 20} bytes" in err.message


async def test_garbage_memory_fails_when_qemu_dies_not_after_the_timeout(
    shm_svm: Any, guest_image: Any, tmp_path: Path
) -> None:
    snapdir = await _snapshot(shm_svm, guest_image, tmp_path)
    await asyncio.to_thread(_fill_with_garbage, snapdir / "vm.mem")
    err = await _restore_fails(shm_svm, snapdir)
    # QEMU refuses the device state that lives in guest RAM (virtio rings), or the guest dies
    assert err.code in (
        ErrorCode.SNAPSHOT_INVALID,
        ErrorCode.SNAPSHOT_MISMATCH,
        ErrorCode.QEMU_EXITED,
        ErrorCode.VM_EXITED,
    ), err
    assert "QEMU" in err.message


async def test_wait_ready_ends_when_qemu_dies(svm: Any, guest_image: Any) -> None:
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    pid = int((await vm.get_info())["engine_info"]["pid"])
    waiting = asyncio.ensure_future(vm.wait_ready(60))
    await asyncio.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(SmartVMError) as err:
        await waiting
    assert time.monotonic() - t0 < 5.0, err.value
    assert err.value.code in (ErrorCode.QEMU_EXITED, ErrorCode.VM_EXITED, ErrorCode.AGENT_UNAVAILABLE)


@pytest.fixture
def small_tmpfs(guest_image: Any) -> Iterator[Path]:
    """A tmpfs as the runtime root with room for the guest's rootfs copy and its boot, but far too
    small for a 256 MiB guest's RAM file (sized from the image: a fixed size broke when it grew)."""
    rootfs_mib = -(-guest_image.rootfs_path.stat().st_blocks * 512 // (1 << 20))
    root = Path(tempfile.mkdtemp(prefix="svfull", dir="/tmp"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={rootfs_mib + 40}m,mode=0700", "tmpfs", str(root)], check=False
    )
    if done.returncode != 0:
        root.rmdir()
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root)], check=True)
        root.rmdir()


async def test_full_runtime_tmpfs_is_named_as_the_cause(
    guest_image: Any, small_tmpfs: Path, tmp_path: Path
) -> None:
    from smartvm.orchestrator import SmartVM

    svm = SmartVM(SmartVMOptions(engine="qemu", runtime_dir=small_tmpfs, data_dir=tmp_path / "data"))
    # the guest touches 200 MiB of its RAM at once: QEMU's RAM file on the small tmpfs runs out
    vm = await svm.create_vm(
        boot_config(guest_image, exec_script="dd if=/dev/zero of=/dev/null bs=200M count=1")
    )
    try:
        await vm.start()
        t0 = time.monotonic()
        with raises_code(ErrorCode.QEMU_EXITED) as err:
            await vm.exec("sleep 30", ready_timeout=60, timeout=60)
        assert time.monotonic() - t0 < FAST_S, err.value
        message = err.value.message
        assert "SIGBUS" in message and "is full" in message and "MiB free" in message, message
        assert "needs up to 256 MiB" in message, message
    finally:
        await vm.kill()
    await _cleaned_up(small_tmpfs)
