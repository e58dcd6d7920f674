"""Small helpers for asserting on the fake Firecracker and on processes."""

from __future__ import annotations

import asyncio
import json
from os import readlink as os_readlink
from pathlib import Path
from typing import Any

from smartvm.config import BootSource, Drive, MachineConfig, MicroVMConfig


def logged_requests(short_tmp: Path) -> list[dict[str, Any]]:
    """Every request the fake executable answered, in order."""
    log = short_tmp / "requests.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_running(executable: Path) -> list[int]:
    """Pids of live processes whose command line mentions ``executable``."""
    pids = []
    needle = str(executable).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and pid_alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def jailer_invocations(short_tmp: Path) -> list[dict[str, Any]]:
    """Every command line the fake jailer was started with (``FAKE_JAILER_ARGV_LOG``)."""
    log = short_tmp / "jailer.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def processes_rooted_in(directory: Path) -> list[int]:
    """Pids of live processes whose root directory (chroot) is ``directory`` or below it."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            root = Path(os_readlink(proc / "root"))
        except OSError:
            continue
        if root.is_relative_to(directory) and pid_alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def text(path: str | Path) -> str:
    """A file's text ('' when missing): /proc entries and logs, from async tests."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return ""


async def read_until(path: Path, wanted: str) -> str:
    """Poll a log file until ``wanted`` appears in it (5 s at most); its text."""
    for _ in range(500):
        content = text(path)
        if wanted in content:
            return content
        await asyncio.sleep(0.01)
    raise AssertionError(f"{wanted!r} never appeared in {path}")


async def vsock_ping(engine: Any) -> bytes:
    """Send one line through the fake's vsock echo server, via the engine's agent stream."""
    reader, writer = await engine.open_agent_stream(timeout=5)
    writer.write(b"ping\n")
    line: bytes = await reader.readline()
    writer.close()
    return line


def fake_vm_config(tmp: Path, vm_id: str = "vm1", *, data_drive: bool = False, **extra: Any) -> MicroVMConfig:
    """A small VM for the fake Firecracker: its kernel and rootfs (``b"pristine"``) are written to
    ``tmp/images``; ``data_drive`` adds a read-only ``data`` drive; ``extra`` sets or overrides fields."""
    images = tmp / "images"
    images.mkdir(exist_ok=True)
    (images / "vmlinux").write_bytes(b"\x7fELF")
    (images / "rootfs.ext4").write_bytes(b"pristine")
    drives = [Drive(drive_id="rootfs", path_on_host=str(images / "rootfs.ext4"), is_root_device=True)]
    if data_drive:
        (images / "data.img").write_bytes(b"data")
        drives.append(Drive(drive_id="data", path_on_host=str(images / "data.img"), is_read_only=True))
    fields: dict[str, Any] = {
        "boot_source": BootSource(
            kernel_image_path=str(images / "vmlinux"), boot_args="console=ttyS0 reboot=k"
        ),
        "machine_config": MachineConfig(vcpu_count=1, mem_size_mib=32),
        "drives": drives,
        **extra,
    }
    return MicroVMConfig(id=vm_id, **fields)
