"""Benchmark 6: the guest agent path on a running VM (QEMU engine): exec round trip, stdout and files.

``true`` measures the fixed cost of one command (request, spawn, exit status back). Stdout is measured
with ``cat`` of a file in the guest's tmpfs (1 MiB, and 16 MiB for the steady rate), and with the
``head -c 1MiB /dev/zero`` of earlier runs, whose producer alone is slow under TCG (busybox head copies
byte by byte): the row with its output sent to /dev/null in the guest shows that part. Files: 10 MiB
written to the guest and read back. The three figures of issue 16 (p50 of ``true``, MiB/s of stdout,
MiB/s of file write + read) are side by side.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from bench.common import BenchTable, Series, time_async
from bench.guests import READY_TIMEOUT_S, engine_facts, guest, qemu_smartvm
from smartvm.agent.client import ExecResult

MiB = 1 << 20
FILE_MIB = 10
BIG_MIB = 16


def _throughput(series: Series, nbytes: int) -> None:
    series.extra["throughput"] = f"{nbytes / series.median / MiB:.1f} MiB/s"


async def run(quick: bool) -> list[BenchTable]:
    config = guest()
    n_true, n_mib, n_big = (10, 3, 2) if quick else (100, 20, 8)
    blob = os.urandom(FILE_MIB * MiB)
    async with qemu_smartvm() as svm:
        vm = await svm.create_vm(config)
        await vm.start()
        await vm.wait_ready(READY_TIMEOUT_S)
        _pid, accel = await engine_facts(vm)
        results: list[tuple[ExecResult, int]] = []
        mismatches: list[int] = []

        def exec_(argv: list[str], size: int) -> Callable[[], Awaitable[None]]:
            async def run_it() -> None:
                results.append((await vm.exec(argv, timeout=120, max_output_bytes=2 * size + 1), size))

            return run_it

        async def file_round_trip() -> None:
            await vm.files.write("/tmp/bench.bin", blob)
            back = await vm.files.read("/tmp/bench.bin")
            if back != blob:
                mismatches.append(len(back))

        make = f"head -c {MiB} /dev/urandom >/tmp/1m; for i in $(seq {BIG_MIB}); do cat /tmp/1m; done"
        make += " >/tmp/big"
        await vm.exec(["sh", "-c", make], timeout=120)
        await exec_(["true"], 0)()  # warm: the first exec spawns the agent's first child
        true = await time_async("exec true", exec_(["true"], 0), n_true)
        head = await time_async(
            "exec head -c 1MiB /dev/zero (stdout captured)",
            exec_(["head", "-c", str(MiB), "/dev/zero"], MiB),
            n_mib,
        )
        head_alone = await time_async(
            "exec sh -c 'head -c 1MiB /dev/zero > /dev/null' (the producer alone)",
            exec_(["sh", "-c", f"head -c {MiB} /dev/zero > /dev/null"], 0),
            n_mib,
        )
        cat = await time_async(
            "exec cat of a 1 MiB file (stdout captured)", exec_(["cat", "/tmp/1m"], MiB), n_mib
        )
        big = await time_async(
            f"exec cat of a {BIG_MIB} MiB file (stdout captured)",
            exec_(["cat", "/tmp/big"], BIG_MIB * MiB),
            n_big,
        )
        files = await time_async(f"write {FILE_MIB} MiB file + read it back", file_round_trip, n_big)
    bad = [
        (r.exit_code, len(r.stdout), size) for r, size in results if r.exit_code != 0 or len(r.stdout) != size
    ]
    if bad or mismatches:
        raise RuntimeError(
            f"exec failed (exit code, stdout bytes, expected): {bad}; differing file read-backs {mismatches}"
        )
    _throughput(head, MiB)
    _throughput(cat, MiB)
    _throughput(big, BIG_MIB * MiB)
    _throughput(files, 2 * FILE_MIB * MiB)  # both directions
    return [
        BenchTable(
            f"Agent path: running VM, QEMU engine ({accel}), 1 vCPU",
            [true, head, head_alone, cat, big, files],
            baseline=true.label,
            notes=[
                "exec: from vm.exec() to its result (exit status and the whole stdout) on the host",
                f"files: vm.files.write of {FILE_MIB} MiB then vm.files.read of it; throughput counts "
                "the bytes moved both ways",
            ],
        )
    ]
