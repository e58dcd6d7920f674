"""Real guests for the VM benchmarks: the default busybox guest on the QEMU engine, in a private
runtime root that is checked to be empty (no VM process, no runtime dir) when the benchmark ends,
also when it fails or is interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from bench.common import BenchSkipped
from smartvm.config import MicroVMConfig
from smartvm.errors import SmartVMError
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM
from smartvm.vm import MicroVM

READY_TIMEOUT_S = 120.0


def guest(memory_mib: int = 256) -> MicroVMConfig:
    """The default busybox guest (what ``smartvm run`` boots), or skip when it cannot be had."""
    if shutil.which("qemu-system-x86_64") is None:
        raise BenchSkipped("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from smartvm.guests import build_guest_config

    try:
        return build_guest_config("busybox", cpus=1, memory_mib=memory_mib)
    except SmartVMError as exc:
        raise BenchSkipped(f"the default guest image cannot be built here: {exc}") from exc


def pids_mentioning(needle: str) -> list[int]:
    """Live processes whose command line contains ``needle`` (our private runtime root)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle.encode() in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def private_root() -> Iterator[Path]:
    """A short private directory on tmpfs like smartvm's default runtime dir (Unix socket paths must
    stay < 108 bytes); afterwards every process still mentioning it (only ever ones we started) is
    killed and the directory removed."""
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="svb", dir=shm if shm.is_dir() else None))
    try:
        yield root
    finally:
        for pid in pids_mentioning(str(root)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.asynccontextmanager
async def qemu_smartvm() -> AsyncIterator[SmartVM]:
    """A SmartVM on the QEMU engine in a private root; every VM is stopped (killed if need be)."""
    with private_root() as root:
        svm = SmartVM(SmartVMOptions(engine="qemu", runtime_dir=root / "run", data_dir=root / "data"))
        try:
            yield svm
        finally:
            await kill_all(svm)
            leftovers = pids_mentioning(str(root))
            if leftovers:
                print(f"warning: processes of the benchmark survived its VMs: {leftovers} (killed)")


async def engine_facts(vm: MicroVM) -> tuple[int, str]:
    """The engine process id and its accelerator (kvm/tcg), from ``vm.get_info()``."""
    info = (await vm.get_info()).get("engine_info", {})
    return int(info["pid"]), str(info.get("accel", "?"))


async def kill_all(svm: SmartVM) -> None:
    """End every VM at once (a benchmark's teardown does not need a graceful guest shutdown)."""
    await asyncio.gather(*(vm.kill() for vm in svm.list_vms()), return_exceptions=True)
    await svm.cleanup()
