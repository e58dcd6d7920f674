"""Opt-in tests against a real Firecracker: set SMARTVM_FIRECRACKER_BIN and have a usable /dev/kvm.

They boot the default guest (kernel + busybox rootfs from smartvm.images) and run the lifecycle:
start, vsock handshake with the guest agent, pause/resume, Full snapshot, restore into a second VM, stop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smartvm.config import MicroVMConfig
from smartvm.errors import SmartVMError
from smartvm.firecracker.vsock import connect_vsock
from smartvm.options import SmartVMOptions

pytestmark = pytest.mark.firecracker
INIT_MARKER = "SMARTVM_INIT_READY"


@pytest.fixture(scope="module")
def firecracker_bin() -> Path:
    value = os.environ.get("SMARTVM_FIRECRACKER_BIN")
    if not value:
        pytest.skip("SMARTVM_FIRECRACKER_BIN is not set (point it at a firecracker binary to run these)")
    path = Path(value)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.skip(f"SMARTVM_FIRECRACKER_BIN={value} is not an executable file")
    from smartvm.kvm_probe import probe_kvm

    kvm = probe_kvm()
    if not kvm.usable:
        pytest.skip(f"KVM cannot run a guest here: {kvm.reason}")
    return path


@pytest.fixture(scope="module")
def guest(firecracker_bin: Path) -> Any:
    try:
        from smartvm.images.guest_image import ensure_default_guest
    except ImportError as exc:
        pytest.skip(f"smartvm.images.guest_image is not available: {exc}")
    try:
        return ensure_default_guest()
    except SmartVMError as exc:
        pytest.skip(f"the default guest cannot be built here: {exc}")


@pytest.fixture
def runtime_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="svfc", dir="/tmp"))
    yield root
    assert not any(p.is_dir() for p in root.iterdir()), "a VM runtime dir survived the test"
    shutil.rmtree(root, ignore_errors=True)


def _config(guest: Any, vm_id: str) -> MicroVMConfig:
    args = guest.boot_args
    for needed in ("console=ttyS0", "reboot=k", "panic=1"):
        if needed.split("=")[0] + "=" not in args:
            args += f" {needed}"
    return MicroVMConfig.model_validate(
        {
            "id": vm_id,
            "boot_source": {"kernel_image_path": str(guest.kernel_path), "boot_args": args},
            "machine_config": {"vcpu_count": 1, "mem_size_mib": 256},
            "drives": [
                {
                    "drive_id": "rootfs",
                    "path_on_host": str(guest.rootfs_path),
                    "is_root_device": True,
                    "is_read_only": guest.rootfs_type == "squashfs",
                }
            ],
        }
    )


def _console(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def _wait_console(path: Path, text: str, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if text in _console(path):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{text!r} did not appear on the console {path} within {timeout}s")


async def _agent_handshake(uds: Path, timeout: float = 30) -> None:
    """The guest agent answers on vsock port 52 once it has started (retry until then)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _reader, writer = await connect_vsock(uds, 52, timeout=5)
        except SmartVMError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        writer.close()
        return


async def test_lifecycle_on_real_firecracker(
    firecracker_bin: Path, guest: Any, runtime_root: Path, tmp_path: Path
) -> None:
    from smartvm.orchestrator import SmartVM
    from smartvm.vm import VMState

    options = SmartVMOptions(
        engine="firecracker",
        firecracker_binary_path=firecracker_bin,
        runtime_dir=runtime_root,
        data_dir=tmp_path / "data",
    )
    async with SmartVM(options) as svm:
        vm = await svm.create_vm(_config(guest, "fc-real-1"))
        await vm.start()
        assert vm.console_log_path is not None
        await _wait_console(vm.console_log_path, INIT_MARKER)
        runtime_dir = vm.get_runtime_dir()
        assert runtime_dir is not None
        await _agent_handshake(runtime_dir / "vsock.sock")
        await vm.pause()
        snap = await vm.create_snapshot(tmp_path / "snap" / "vm.state", tmp_path / "snap" / "vm.mem")
        await vm.resume()
        await vm.stop()
        assert vm.state is VMState.STOPPED

        clone = await svm.restore_vm(snap.directory, vm_id="fc-real-2")
        assert clone.state is VMState.RUNNING
        assert (await clone.get_info())["engine_info"]["state"] == "Running"
        await clone.stop()
