"""Benchmark 5: a MicroVM restored from a snapshot until its agent answers, against a cold boot
until its agent answers (QEMU engine, the default busybox guest).

One snapshot is taken of a booted guest whose agent had answered; then restores and cold boots
alternate (so background load hits both alike). Each VM is killed untimed afterwards.
"""

from __future__ import annotations

import time

from bench.common import BenchTable, Series
from bench.guests import READY_TIMEOUT_S, engine_facts, guest, qemu_smartvm
from smartvm.config import MicroVMConfig
from smartvm.orchestrator import SmartVM

COLD = "cold boot until the agent answers"
RESTORE = "restore from snapshot until the agent answers"


async def _cold(svm: SmartVM, config: MicroVMConfig) -> float:
    t0 = time.perf_counter()
    vm = await svm.create_vm(config)
    try:
        await vm.start()
        await vm.wait_ready(READY_TIMEOUT_S)
        return time.perf_counter() - t0
    finally:
        await vm.kill()


async def _restore(svm: SmartVM, snapshot_dir: str) -> float:
    t0 = time.perf_counter()
    vm = await svm.restore_vm(snapshot_dir)
    try:
        await vm.wait_ready(READY_TIMEOUT_S)
        return time.perf_counter() - t0
    finally:
        await vm.kill()


async def run(quick: bool) -> list[BenchTable]:
    config = guest()
    n = 3 if quick else 20
    cold, restored = Series(COLD), Series(RESTORE)
    async with qemu_smartvm() as svm:
        snapshot_dir = svm.get_runtime_dir().parent / "snap"
        source = await svm.create_vm(config)
        await source.start()
        await source.wait_ready(READY_TIMEOUT_S)
        _pid, accel = await engine_facts(source)
        t0 = time.perf_counter()
        snapshot = await source.create_snapshot(
            snapshot_dir / "vm.state", snapshot_dir / "vm.mem", pause_vm=True
        )
        took = time.perf_counter() - t0
        await source.kill()
        size = sum(f.stat().st_blocks * 512 for f in snapshot_dir.iterdir() if f.is_file())
        for _ in range(n):
            cold.samples.append(await _cold(svm, config))
            restored.samples.append(await _restore(svm, str(snapshot.directory)))
    mib = config.machine_config.mem_size_mib
    return [
        BenchTable(
            f"Restore vs cold boot: 1 vCPU, {mib} MiB busybox guest, QEMU engine ({accel})",
            [cold, restored],
            baseline=COLD,
            unit="s",
            notes=[
                f"taking the snapshot (pause, save, resume) took {took:.2f}s; it occupies "
                f"{size >> 20} MiB on tmpfs",
                "both end when vm.wait_ready() returns (the agent said hello; after a restore the guest "
                "clock is also set)",
            ],
        )
    ]
