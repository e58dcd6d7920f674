"""A VM restored from a snapshot runs commands through its agent, and its clock is not in the past."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from guest_support import boot_config

pytestmark = pytest.mark.integration

LAG_S = 4.0  # how long the snapshot waits before it is restored


async def test_exec_and_clock_after_restore(svm: Any, guest_image: Any, tmp_path: Path) -> None:
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    await vm.wait_ready(120)
    await vm.files.write("/tmp/marker", b"from-before-the-snapshot")
    snapdir = tmp_path / "snap"
    await vm.create_snapshot(snapdir / "vm.state", snapdir / "vm.mem", pause_vm=True)
    await vm.kill()

    await asyncio.sleep(LAG_S)  # without the clock fix-up the clone would live LAG_S in the past
    clone = await svm.restore_vm(snapdir)
    try:
        before = time.time()
        # busybox date has whole seconds only
        result = await clone.exec(["sh", "-c", "cat /tmp/marker; echo; date +%s"], timeout=30)
        assert result.exit_code == 0, result
        marker, guest_now = result.stdout_text.split()
        assert marker == "from-before-the-snapshot"
        lag = before - int(guest_now)
        assert lag < 2.0, f"guest clock {lag:.1f}s behind the host"
    finally:
        await clone.kill()
