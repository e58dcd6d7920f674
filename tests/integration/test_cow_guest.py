"""A real guest under QEMU boots from a qcow2 CoW overlay of the shared rootfs and writes to it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
from guest_support import boot_config

from smartvm.sandbox.cow.qcow2 import Qcow2Strategy

pytestmark = pytest.mark.integration


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_guest_boots_from_qcow2_overlay(svm: Any, guest_image: Any, tmp_path: Path) -> None:
    if guest_image.rootfs_type == "squashfs" or shutil.which("qemu-img") is None:
        pytest.skip("needs a writable raw rootfs and qemu-img")
    base = Path(guest_image.rootfs_path)
    before = _sha(base)
    disk = Qcow2Strategy("qemu").create(base, tmp_path / "sb", "sb-0000abcd")
    try:
        config = boot_config(guest_image)
        root = config.drives[0].model_copy(
            update={"path_on_host": str(disk.device_path), "is_read_only": False, "ephemeral": False}
        )
        vm = await svm.create_vm(config.model_copy(update={"drives": [root]}))
        await vm.start()
        await vm.agent.wait_ready(120.0)
        r = await vm.agent.exec("head -c 3000000 /dev/urandom > /cow-test && sync && wc -c < /cow-test")
        assert r.exit_code == 0 and r.stdout_text.strip() == "3000000"
        await vm.stop()
        assert disk.allocated_bytes() > 3_000_000  # the writes landed in the overlay
        assert _sha(base) == before  # and not in the shared base
    finally:
        disk.release()
