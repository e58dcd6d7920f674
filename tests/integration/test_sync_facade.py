"""The blocking twins (``smartvm.sync``) drive a real guest from plain, non-async code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from guest_support import assert_nothing_left, boot_config

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.options import SmartVMOptions
from smartvm.sync import SmartVM
from smartvm.vm import VMState

pytestmark = pytest.mark.integration


def test_sync_lifecycle_exec_files_snapshot(
    guest_image: Any, qemu_options: SmartVMOptions, tmp_path: Path
) -> None:
    with SmartVM(qemu_options) as svm:
        vm = svm.create_vm(boot_config(guest_image))
        vm.start()
        vm.wait_ready(120)
        result = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=30)
        assert (result.exit_code, result.stdout_text, result.stderr_text) == (3, "out\n", "err\n")
        vm.files.write("/tmp/sync.txt", b"written from sync code")
        assert vm.files.read("/tmp/sync.txt") == b"written from sync code"
        with pytest.raises(SmartVMError) as missing:
            vm.files.read("/tmp/no-such-file")
        assert missing.value.code is ErrorCode.GUEST_FILE_ERROR

        snapdir = tmp_path / "snap"
        snapshot = vm.create_snapshot(snapdir / "vm.state", snapdir / "vm.mem", pause_vm=True)
        assert vm.state is VMState.RUNNING and snapshot.engine == "qemu"
        vm.stop()
        assert vm.state is VMState.STOPPED

        clone = svm.restore_vm(tmp_path / "snap")
        assert clone.exec("cat /tmp/sync.txt", timeout=30).stdout_text == "written from sync code"
        assert svm.vm_count == 1
    # leaving the block stopped the clone and removed everything it had
    assert clone.state is VMState.STOPPED
    assert_nothing_left(qemu_options.runtime_dir)


def test_sync_errors_are_smartvm_errors(guest_image: Any, qemu_options: SmartVMOptions) -> None:
    with SmartVM(qemu_options) as svm:
        vm = svm.create_vm(boot_config(guest_image))
        with pytest.raises(SmartVMError) as err:
            vm.pause()
        assert err.value.code is ErrorCode.INVALID_STATE
