"""The cost of the E2B compatibility layer: the official e2b SDK through the envd face (uvicorn on a
loopback port, in this process) against smartvm's own API, on one running guest (QEMU engine).

``commands.run("true")`` runs ``/bin/bash -l -c true`` (the busybox guest gets a ``/bin/bash`` that
execs its sh), so the native row runs that same argv; the difference is the compatibility layer:
HTTP, Connect framing, the SDK itself. Sandbox creation needs the REST face and is not measured here.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.common import BenchTable, Series
from bench.guests import READY_TIMEOUT_S, engine_facts, guest, qemu_smartvm

MiB = 1 << 20
TESTS = str(Path(__file__).resolve().parents[1] / "tests")
BASH = "[ -e /bin/bash ] || { printf '#!/bin/sh\\nexec /bin/sh \"$@\"\\n' > /bin/bash; chmod 755 /bin/bash; }"


async def _interleaved(cases: list[tuple[str, Callable[[], Awaitable[None]]]], n: int) -> list[Series]:
    """Time the cases in turns (a, b, a, b, ...): a slow phase of the shared machine hits both alike."""
    rows = [Series(label) for label, _ in cases]
    for _ in range(n):
        for row, (_, fn) in zip(rows, cases, strict=True):
            t0 = time.perf_counter()
            await fn()
            row.samples.append(time.perf_counter() - t0)
    return rows


async def run(quick: bool) -> list[BenchTable]:
    sys.path.insert(0, TESTS)  # the SDK wiring and the uvicorn runner of the envd tests
    from e2b_support import sdk_sandbox, serve
    from smartvm.service.e2b import EnvdApp, EnvdBinding

    n_true, n_io = (10, 2) if quick else (50, 5)
    data = os.urandom(10 * MiB)
    async with qemu_smartvm() as svm:
        vm = await svm.create_vm(guest())
        await vm.start()
        await vm.wait_ready(READY_TIMEOUT_S)
        _pid, accel = await engine_facts(vm)
        await vm.exec(["/bin/sh", "-c", BASH])
        async with serve(EnvdApp({"sb-bench000": EnvdBinding("t", vm)}.get)) as url:
            sbx = sdk_sandbox(url, "sb-bench000", "t")

            async def native_true() -> None:
                assert (await vm.exec(["/bin/bash", "-l", "-c", "true"])).exit_code == 0

            async def sdk_true() -> None:
                assert (await sbx.commands.run("true")).exit_code == 0

            async def native_io() -> None:
                await vm.files.write("/tmp/bench.bin", data)
                assert len(await vm.files.read("/tmp/bench.bin")) == len(data)

            async def sdk_io() -> None:
                await sbx.files.write("/tmp/bench.bin", data)
                assert len(await sbx.files.read("/tmp/bench.bin", format="bytes")) == len(data)

            await native_true()
            await sdk_true()
            rows_true = await _interleaved(
                [
                    ("vm.exec(['/bin/bash', '-l', '-c', 'true'])", native_true),
                    ("SDK commands.run('true')", sdk_true),
                ],
                n_true,
            )
            rows_io = await _interleaved(
                [("vm.files.write + read, 10 MiB", native_io), ("SDK files.write + read, 10 MiB", sdk_io)],
                n_io,
            )
    for row in rows_io:
        row.extra["throughput"] = f"{20 / row.median:.1f} MiB/s"
    return [
        BenchTable(
            f"E2B SDK through the envd face vs smartvm's API: one command, QEMU ({accel}), 1 vCPU",
            rows_true,
            baseline=rows_true[0].label,
            notes=["SDK, envd face and uvicorn share this process (2 cores)"],
        ),
        BenchTable(
            "E2B SDK through the envd face vs smartvm's API: 10 MiB up and down",
            rows_io,
            baseline=rows_io[0].label,
        ),
    ]
