"""Boot, stop and pause real busybox guests under QEMU."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from guest_support import (
    INIT_MARKER,
    assert_nothing_left,
    boot_config,
    console_text,
    open_console,
    path_gone,
    processes_mentioning,
    wait_console,
    wait_stopped,
)

from smartvm.vm import VMState

pytestmark = pytest.mark.integration

COUNTER = 'i=0; while true; do echo "TICK $i"; i=$((i+1)); sleep 0.2; done'


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^TICK (\d+)\r?$", text, re.M)]


async def test_boot_shows_init_marker_and_stop_powers_off(svm: Any, guest_image: Any) -> None:
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    await wait_console(vm, INIT_MARKER)
    info = await vm.get_info()
    assert info["engine"] == "qemu"
    assert info["engine_info"]["state"] == "running"
    runtime_dir = Path(vm.get_runtime_dir())
    assert (runtime_dir / "qmp.sock").exists()
    assert processes_mentioning(str(runtime_dir))

    with open_console(vm) as console:
        await vm.stop()
        text = console.read().decode(errors="replace")
    assert "Power down" in text, f"the guest did not power off cleanly:\n{text[-2000:]}"
    assert vm.state.value == "stopped"
    assert path_gone(runtime_dir)
    assert processes_mentioning(str(runtime_dir)) == []


async def test_pause_stops_the_guest_and_resume_continues_it(svm: Any, guest_image: Any) -> None:
    vm = await svm.create_vm(boot_config(guest_image, exec_script=COUNTER))
    await vm.start()
    await wait_console(vm, "TICK 2")

    await vm.pause()
    assert vm.state.value == "paused"
    assert (await vm.get_info())["engine_info"]["state"] == "paused"
    before = ticks(console_text(vm))
    await asyncio.sleep(1.5)  # about seven ticks if the guest were still running
    assert ticks(console_text(vm)) == before

    await vm.resume()
    await wait_console(vm, f"TICK {before[-1] + 2}", timeout=30)
    after = ticks(console_text(vm))
    assert after[: len(before)] == before
    assert after[len(before)] == before[-1] + 1  # continues, no restart
    await vm.stop()


async def test_guest_poweroff_cleans_up_without_stop(svm: Any, guest_image: Any, runtime_root: Path) -> None:
    """A guest that powers itself off leaves no runtime dir, even if nobody calls stop()."""
    vm = await svm.create_vm(boot_config(guest_image, exec_script="sleep 0.5; poweroff -f"))
    await vm.start()
    runtime_dir = vm.get_runtime_dir()
    assert runtime_dir is not None and runtime_dir.exists()
    await wait_stopped(vm)
    for _ in range(100):  # the watcher tears down right after the process exits
        if vm.get_runtime_dir() is None:
            break
        await asyncio.sleep(0.05)
    assert not runtime_dir.exists()
    assert vm.state is VMState.STOPPED and vm.get_runtime_dir() is None
    assert svm.get_vm(vm.id) is None
    assert_nothing_left(runtime_root)
