"""Failures of real guests under QEMU end in clear errors and leave nothing behind."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from guest_support import (
    INIT_MARKER,
    assert_nothing_left,
    boot_config,
    path_gone,
    wait_console,
    wait_stopped,
)

from smartvm.errors import ErrorCode, SmartVMError

pytestmark = pytest.mark.integration


async def test_missing_kernel_fails_and_leaves_nothing(svm: Any, guest_image: Any, tmp_path: Path) -> None:
    config = boot_config(guest_image).model_copy(deep=True)
    config.boot_source.kernel_image_path = str(tmp_path / "no-such-vmlinux")
    vm = await svm.create_vm(config)
    with pytest.raises(SmartVMError) as err:
        await vm.start()
    assert err.value.code == ErrorCode.BOOT_FAILED
    assert "no-such-vmlinux" in err.value.message
    assert vm.state.value == "error"
    assert_nothing_left(svm.options.runtime_dir)


async def test_kernel_qemu_cannot_load_fails_with_qemus_message(
    svm: Any, guest_image: Any, tmp_path: Path
) -> None:
    bogus = tmp_path / "vmlinux"
    bogus.write_bytes(b"this is not a kernel\n" * 100)
    config = boot_config(guest_image).model_copy(deep=True)
    config.boot_source.kernel_image_path = str(bogus)
    vm = await svm.create_vm(config)
    with pytest.raises(SmartVMError) as err:
        await vm.start()
    assert err.value.code == ErrorCode.BOOT_FAILED
    assert "QEMU exited" in err.value.message and "kernel" in err.value.message.lower()
    assert_nothing_left(svm.options.runtime_dir)


async def test_rootfs_that_is_not_a_filesystem_panics_with_the_console_in_the_error(
    svm: Any, guest_image: Any, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(4096) * 256)
    config = boot_config(guest_image).model_copy(deep=True)
    config.drives[0].path_on_host = str(junk)
    config.drives[0].is_read_only = False
    vm = await svm.create_vm(config)
    await vm.start()
    await wait_stopped(vm, timeout=60)  # panic=1 + -no-reboot: QEMU ends by itself
    for _ in range(100):  # the watcher keeps the console tail, then cleans up
        if vm.exit_console is not None:
            break
        await asyncio.sleep(0.05)
    assert vm.exit_console is not None and "Kernel panic" in vm.exit_console
    with pytest.raises(SmartVMError) as err:
        await vm.exec("true")
    assert err.value.code is ErrorCode.VM_EXITED
    assert "Kernel panic" in err.value.message  # the console tail is in the error
    await vm.stop()
    assert_nothing_left(svm.options.runtime_dir)


async def test_qemu_killed_from_outside_leaves_nothing(svm: Any, guest_image: Any) -> None:
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    await wait_console(vm, INIT_MARKER)
    pid = (await vm.get_info())["engine_info"]["pid"]
    runtime_dir = Path(vm.get_runtime_dir())
    os.kill(pid, signal.SIGKILL)
    await wait_stopped(vm, timeout=10)
    with pytest.raises(SmartVMError) as err:
        await vm.pause()
    # the same answer before and after the exit watcher has cleaned up (it used to race)
    assert err.value.code == ErrorCode.VM_EXITED
    await vm.stop()
    assert path_gone(runtime_dir)
    assert_nothing_left(svm.options.runtime_dir)
