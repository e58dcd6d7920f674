"""Benchmark 7: host memory per idle VM, for 1, 5 and 10 VMs (QEMU engine, 128 MiB guests).

Per VM: the QEMU process's VmRSS (/proc/<pid>/status) and Pss (/proc/<pid>/smaps_rollup: shared
pages split between the processes sharing them), and how much our own process grew per VM (its
VmRSS with the VMs running minus before they were created). Measured once every agent answered
and the guests then idled for a moment.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.common import BenchTable, Series
from bench.guests import READY_TIMEOUT_S, engine_facts, guest, kill_all, qemu_smartvm
from smartvm.config import MicroVMConfig, new_vm_id
from smartvm.orchestrator import SmartVM

GUEST_MIB = 128
IDLE_S = 2.0


def _kib_field(path: Path, name: str) -> int:
    """A ``Name:  N kB`` field of a /proc file, in bytes."""
    for line in path.read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{path} has no {name} field")


def rss(pid: int | str) -> int:
    return _kib_field(Path(f"/proc/{pid}/status"), "VmRSS")


def pss(pid: int | str) -> int:
    return _kib_field(Path(f"/proc/{pid}/smaps_rollup"), "Pss")


def uss(pid: int | str) -> int:
    """Memory only this process holds (its private pages): what one more such process costs."""
    rollup = Path(f"/proc/{pid}/smaps_rollup")
    return _kib_field(rollup, "Private_Clean") + _kib_field(rollup, "Private_Dirty")


async def _boot(svm: SmartVM, config: MicroVMConfig) -> int:
    vm = await svm.create_vm(config.model_copy(update={"id": new_vm_id()}))
    await vm.start()
    await vm.wait_ready(READY_TIMEOUT_S)
    pid, _accel = await engine_facts(vm)
    return pid


async def measure(svm: SmartVM, config: MicroVMConfig, n: int) -> list[Series]:
    before = rss("self")
    try:
        pids = await asyncio.gather(*(_boot(svm, config) for _ in range(n)))
        await asyncio.sleep(IDLE_S)
        engine_rss = Series(f"{n} VM(s): QEMU VmRSS per VM", [float(rss(p)) for p in pids])
        engine_pss = Series(f"{n} VM(s): QEMU Pss per VM", [float(pss(p)) for p in pids])
        growth = (rss("self") - before) / n
        ours = Series(f"{n} VM(s): smartvm process growth per VM", [growth])
        ours.extra["total"] = f"{growth / 1024:.0f} KiB per VM"
    finally:
        await kill_all(svm)
    for s in (engine_rss, engine_pss):
        s.extra["total"] = f"{sum(s.samples) / (1 << 20):.0f} MiB"
    return [engine_rss, engine_pss, ours]


async def run(quick: bool) -> list[BenchTable]:
    config = guest(memory_mib=GUEST_MIB)
    counts = (1, 2) if quick else (1, 5, 10)
    series: list[Series] = []
    async with qemu_smartvm() as svm:
        await _boot(svm, config)  # warm-up: lazy imports and allocator pools, not per-VM cost
        await kill_all(svm)
        for n in counts:
            series += await measure(svm, config, n)
    return [
        BenchTable(
            f"Host memory per idle VM: {GUEST_MIB} MiB busybox guests, QEMU engine",
            series,
            unit="MiB",
            notes=[
                f"measured {IDLE_S:.0f}s after every agent answered; guest RAM is a shared file on tmpfs, "
                "so VmRSS and Pss include the guest pages it touched",
                "smartvm process growth: its VmRSS with the VMs running minus before they were created, / N "
                "(after one warm-up VM, so one-time imports are not counted)",
            ],
        )
    ]
