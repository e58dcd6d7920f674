"""Benchmark 6: exec round trip through the guest agent on a running VM (QEMU engine).

``true`` measures the fixed cost of one command (request, spawn, exit status back); a command
printing 1 MiB adds moving its output over the agent channel (virtio-serial on QEMU).
"""

from __future__ import annotations

from bench.common import BenchTable, time_async
from bench.guests import READY_TIMEOUT_S, engine_facts, guest, qemu_smartvm
from smartvm.agent.client import ExecResult

MiB = 1 << 20


async def run(quick: bool) -> list[BenchTable]:
    config = guest()
    n_true, n_mib = (10, 3) if quick else (100, 20)
    async with qemu_smartvm() as svm:
        vm = await svm.create_vm(config)
        await vm.start()
        await vm.wait_ready(READY_TIMEOUT_S)
        _pid, accel = await engine_facts(vm)
        results: list[ExecResult] = []

        async def exec_true() -> None:
            results.append(await vm.exec(["true"], timeout=30))

        async def exec_mib() -> None:
            results.append(await vm.exec(["head", "-c", str(MiB), "/dev/zero"], timeout=60))

        await exec_true()  # warm: the first exec spawns the agent's first child
        true = await time_async("exec true", exec_true, n_true)
        one_mib = await time_async("exec head -c 1MiB /dev/zero (stdout captured)", exec_mib, n_mib)
    bad = [r for r in results if r.exit_code != 0]
    short = [len(r.stdout) for r in results[-n_mib:] if len(r.stdout) != MiB]
    if bad or short:
        raise RuntimeError(f"exec failed: exit codes {[r.exit_code for r in bad]}, short outputs {short}")
    one_mib.extra["throughput"] = f"{MiB / one_mib.median / MiB:.1f} MiB/s"
    return [
        BenchTable(
            f"Exec round trip through the agent: running VM, QEMU engine ({accel}), 1 vCPU",
            [true, one_mib],
            baseline=true.label,
            notes=["time from vm.exec() to its result (exit status and the whole stdout) on the host"],
        )
    ]
