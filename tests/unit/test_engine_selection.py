"""``engine="auto"``: Firecracker where it can run (also without QEMU), decided off the event loop."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from fc_fake.helpers import fake_vm_config

from smartvm import kvm_probe
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM

pytest_plugins = ["fc_fake.fixtures"]


def _no_qemu_on_path(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{empty}:{os.path.dirname(sys.executable)}")
    monkeypatch.delenv("SMARTVM_FIRECRACKER_BIN", raising=False)


async def test_auto_picks_firecracker_when_there_is_no_qemu(
    fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kvm_probe.kvm_device_problem() is not None:
        pytest.skip(f"needs an accessible KVM device: {kvm_probe.kvm_device_problem()}")
    _no_qemu_on_path(short_tmp, monkeypatch)
    options = SmartVMOptions(engine="auto", firecracker_binary_path=fake_binary, runtime_dir=short_tmp / "rt")
    svm = SmartVM(options)
    vm = await svm.create_vm(fake_vm_config(short_tmp, "vm-auto"))
    assert vm.engine_name == "firecracker"
    await svm.cleanup()


async def test_engine_selection_does_not_block_the_event_loop(
    fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deciding may run the KVM probe guest (here a QEMU that takes a second and fails): meanwhile the
    event loop keeps running other tasks."""
    if kvm_probe.kvm_device_problem() is not None:
        pytest.skip(f"needs an accessible KVM device: {kvm_probe.kvm_device_problem()}")
    monkeypatch.setenv("SMARTVM_CACHE_DIR", str(short_tmp / "cache"))  # no cached probe answer
    monkeypatch.setattr(kvm_probe, "_memory", {})
    qemu = short_tmp / "slow-qemu"
    qemu.write_text("#!/bin/sh\nsleep 1\nexit 1\n")
    qemu.chmod(0o755)
    options = SmartVMOptions(
        engine="auto",
        firecracker_binary_path=fake_binary,
        qemu_binary_path=qemu,
        runtime_dir=short_tmp / "rt",
    )
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await asyncio.sleep(0)
        vm = await SmartVM(options).create_vm(fake_vm_config(short_tmp, "vm-auto"))
    finally:
        task.cancel()
    assert vm.engine_name == "qemu"  # the probe guest failed: KVM cannot run Firecracker here
    assert ticks >= 10, f"the event loop ran only {ticks} ticks while the engine was chosen"
