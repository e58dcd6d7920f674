"""Helpers for real-guest tests (imported as ``guest_support``; fixtures are in conftest.py).

Build configs with :func:`boot_config`, watch the console with :func:`wait_console`, and check for
leaks with :func:`assert_nothing_left`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path
from typing import Any, BinaryIO

from smartvm.config import MicroVMConfig

INIT_MARKER = "SMARTVM_INIT_READY"


def boot_config(
    guest: Any,
    extra_boot_args: str = "",
    exec_script: str | None = None,
    *,
    vm_id: str | None = None,
    mem_size_mib: int = 256,
    vcpu_count: int = 1,
    extra_drives: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> MicroVMConfig:
    """A MicroVMConfig booting ``guest``; ``exec_script`` runs in the background after init
    (stdout/stderr on the console) via ``smartvm.exec_b64``."""
    args = [guest.boot_args]
    if extra_boot_args:
        args.append(extra_boot_args)
    if exec_script is not None:
        args.append("smartvm.exec_b64=" + base64.b64encode(exec_script.encode()).decode())
    root = {
        "drive_id": "rootfs",
        "path_on_host": str(guest.rootfs_path),
        "is_root_device": True,
        "is_read_only": guest.rootfs_type == "squashfs",
    }
    data: dict[str, Any] = {
        "boot_source": {"kernel_image_path": str(guest.kernel_path), "boot_args": " ".join(args)},
        "machine_config": {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib},
        "drives": [root, *(extra_drives or [])],
        "entropy": {},  # virtio-rng: the agent's Python would wait for entropy at start-up without it
        **fields,
    }
    if vm_id is not None:
        data["id"] = vm_id
    return MicroVMConfig.model_validate(data)


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (e.g. a runtime root)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def assert_nothing_left(root: Path) -> None:
    """No VM process, runtime dir or socket under ``root`` survived."""
    deadline = time.monotonic() + 5
    while processes_mentioning(str(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(str(root)) == [], "a VM process outlived its VM"
    leftovers = sorted(str(p) for p in root.rglob("*")) if root.exists() else []
    assert leftovers == [], f"left behind: {leftovers}"


def console_text(vm: Any) -> str:
    path = vm.console_log_path
    if path is None or not Path(path).exists():
        return ""
    return Path(path).read_text(errors="replace")


async def wait_console(vm: Any, text: str, timeout: float = 60.0, *, count: int = 1) -> str:
    """Wait until ``text`` appears ``count`` times on the VM's console; fail with the console tail
    if the VM dies or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        console = console_text(vm)
        if console.count(text) >= count:
            return console
        if vm.state.value == "stopped":
            raise AssertionError(f"VM {vm.id} stopped while waiting for {text!r}:\n{console[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not seen within {timeout}s:\n{console[-3000:]}")
        await asyncio.sleep(0.05)


async def wait_stopped(vm: Any, timeout: float = 60.0) -> None:
    """Wait until the VM's hypervisor has gone (e.g. after a guest panic)."""
    deadline = time.monotonic() + timeout
    while vm.state.value != "stopped":
        if time.monotonic() > deadline:
            tail = console_text(vm)[-2000:]
            raise AssertionError(f"VM {vm.id} still {vm.state.value} after {timeout}s:\n{tail}")
        await asyncio.sleep(0.05)


def open_console(vm: Any) -> BinaryIO:
    """The VM's console log, opened: it stays readable after stop() removes the runtime dir."""
    return open(vm.console_log_path, "rb")


def path_gone(path: Path) -> bool:
    return not path.exists()
