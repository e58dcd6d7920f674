"""Benchmark 6: the guest agent path on a running VM (QEMU engine): exec round trip, stdout and files.

``true`` measures the fixed cost of one command (request, spawn, exit status back); a command
printing 1 MiB adds moving its output over the agent channel (virtio-serial on QEMU); a 10 MiB file
written to the guest and read back measures the file path both ways. The three figures of issue 16
(p50 of ``true``, MiB/s of stdout, MiB/s of file write + read) are printed side by side.
"""

from __future__ import annotations

import os

from bench.common import BenchTable, Series, time_async
from bench.guests import READY_TIMEOUT_S, engine_facts, guest, qemu_smartvm
from smartvm.agent.client import ExecResult

MiB = 1 << 20
FILE_MIB = 10


def _throughput(series: Series, nbytes: int) -> str:
    return f"{nbytes / series.median / MiB:.1f} MiB/s"


async def run(quick: bool) -> list[BenchTable]:
    config = guest()
    n_true, n_mib, n_file = (10, 3, 2) if quick else (100, 20, 8)
    blob = os.urandom(FILE_MIB * MiB)
    async with qemu_smartvm() as svm:
        vm = await svm.create_vm(config)
        await vm.start()
        await vm.wait_ready(READY_TIMEOUT_S)
        _pid, accel = await engine_facts(vm)
        results: list[ExecResult] = []
        mismatches: list[int] = []

        async def exec_true() -> None:
            results.append(await vm.exec(["true"], timeout=30))

        async def exec_mib() -> None:
            results.append(await vm.exec(["head", "-c", str(MiB), "/dev/zero"], timeout=60))

        async def file_round_trip() -> None:
            await vm.files.write("/tmp/bench.bin", blob)
            back = await vm.files.read("/tmp/bench.bin")
            if back != blob:
                mismatches.append(len(back))

        await exec_true()  # warm: the first exec spawns the agent's first child
        true = await time_async("exec true", exec_true, n_true)
        one_mib = await time_async("exec head -c 1MiB /dev/zero (stdout captured)", exec_mib, n_mib)
        files = await time_async(f"write {FILE_MIB} MiB file + read it back", file_round_trip, n_file)
    bad = [r for r in results if r.exit_code != 0]
    short = [len(r.stdout) for r in results[-n_mib:] if len(r.stdout) != MiB]
    if bad or short or mismatches:
        raise RuntimeError(
            f"exec failed: exit codes {[r.exit_code for r in bad]}, short outputs {short}, "
            f"file read-backs that differ (sizes) {mismatches}"
        )
    one_mib.extra["throughput"] = _throughput(one_mib, MiB)
    files.extra["throughput"] = _throughput(files, 2 * FILE_MIB * MiB)  # both directions
    return [
        BenchTable(
            f"Agent path: running VM, QEMU engine ({accel}), 1 vCPU",
            [true, one_mib, files],
            baseline=true.label,
            notes=[
                "exec: from vm.exec() to its result (exit status and the whole stdout) on the host",
                f"files: vm.files.write of {FILE_MIB} MiB then vm.files.read of it; throughput counts "
                "the bytes moved both ways",
            ],
        )
    ]
