"""Benchmark 9: sandboxes (QEMU engine, 256 MiB busybox ``base`` template, TCG here).

Side by side in one run: a cold boot of the same guest until exec works; creating a sandbox from
the built template until exec works; pause to disk; resume until exec works, right after the pause
and after the sandbox stayed paused a few seconds (the host's freed memory is colder then); then
density (the PSS of each idle sandbox's QEMU: the template's memory file is shared read-only between
clones, and its private memory, what one more sandbox costs; again once they were paused and
resumed) with an estimate of how many idle sandboxes fit in the memory available now, and the disk
each sandbox allocates right after create.
"""

from __future__ import annotations

import asyncio
import time

from bench.common import BenchTable, Series, time_async
from bench.guests import READY_TIMEOUT_S, guest, private_root, qemu_smartvm
from bench.memory import pss, rss, uss
from smartvm.config import new_vm_id
from smartvm.options import SmartVMOptions
from smartvm.sandbox.manager import SandboxManager
from smartvm.sandbox.settings import SandboxSettings

IDLE_S = 2.0
PAUSED_S = 3.0  # how long a sandbox stays paused before the "resume after a while" row


async def _cold_boot(n: int) -> Series:
    config = guest(memory_mib=256)
    async with qemu_smartvm() as svm:

        async def boot() -> None:
            vm = await svm.create_vm(config.model_copy(update={"id": new_vm_id()}))
            await vm.start()
            await vm.exec(["true"], ready_timeout=READY_TIMEOUT_S)
            await vm.kill()

        return await time_async("cold boot until exec works (same guest)", boot, n)


async def _warm_ready(mgr: SandboxManager) -> None:
    """Wait (outside the timing) until the manager's warm pool holds a sandbox again."""
    for _ in range(1200):
        if mgr._warm.ids():
            return
        await asyncio.sleep(0.05)


async def _qemu_pid(mgr: SandboxManager, sid: str) -> int:
    info = await mgr._live[sid].vm.get_info()
    return int(info["engine_info"]["pid"])


def _available_mib() -> int:
    from smartvm.sandbox.manager import _host_memory_mib

    return _host_memory_mib()[1]


async def run(quick: bool) -> list[BenchTable]:
    n = 3 if quick else 10
    density_n = 3 if quick else 10
    cold = await _cold_boot(2 if quick else 5)
    with private_root() as root:
        options = SmartVMOptions(engine="qemu", runtime_dir=root / "run")
        settings = SandboxSettings(data_dir=root / "data", slot_pool_size=2, warm_pool_size=0)
        mgr = SandboxManager(options=options, settings=settings)
        async with mgr:
            t0 = time.perf_counter()
            first = await mgr.create("base")
            build = Series("first create (builds the base template)", [time.perf_counter() - t0])
            await first.kill()
            create, pause, resume, later = (
                Series("create (no warm sandbox) until exec works"),
                Series("pause to disk"),
                Series("resume until exec works"),
                Series(f"resume after {PAUSED_S:.0f} s paused until exec works"),
            )
            disk: list[float] = []
            for _ in range(n):
                t0 = time.perf_counter()
                sbx = await mgr.create("base")
                await sbx.commands.run(["true"])
                create.samples.append(time.perf_counter() - t0)
                disk.append(float((await sbx.info()).disk_bytes))
                t0 = time.perf_counter()
                await sbx.pause()
                pause.samples.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await sbx.resume()
                await sbx.commands.run(["true"])
                resume.samples.append(time.perf_counter() - t0)
                # a sandbox paused for a while: the memory the host freed meanwhile is colder
                await sbx.pause()
                await asyncio.sleep(PAUSED_S)
                t0 = time.perf_counter()
                await sbx.resume()
                await sbx.commands.run(["true"])
                later.samples.append(time.perf_counter() - t0)
                await sbx.kill()
            boxes = [await mgr.create("base") for _ in range(density_n)]
            await asyncio.sleep(IDLE_S)
            pids = [await _qemu_pid(mgr, b.id) for b in boxes]
            pss_series = Series(
                f"{density_n} idle sandboxes: QEMU Pss per sandbox", [float(pss(p)) for p in pids]
            )
            rss_series = Series(
                f"{density_n} idle sandboxes: QEMU VmRSS per sandbox", [float(rss(p)) for p in pids]
            )
            uss_series = Series(
                f"{density_n} idle sandboxes: QEMU private memory per sandbox",
                [float(uss(p)) for p in pids],
            )
            fit = int(_available_mib() / (pss_series.median / (1 << 20))) if pss_series.median else 0
            pss_series.extra["fit"] = f"~{fit} more fit in {_available_mib()} MiB available"
            for b in boxes:  # the same sandboxes once paused and resumed (RAM from their streams)
                await b.pause()
                await b.resume()
            await asyncio.sleep(IDLE_S)
            resumed = [await _qemu_pid(mgr, b.id) for b in boxes]
            resumed_pss = Series(
                "the same, paused and resumed: QEMU Pss per sandbox", [float(pss(p)) for p in resumed]
            )
            resumed_uss = Series(
                "the same, paused and resumed: QEMU private memory per sandbox",
                [float(uss(p)) for p in resumed],
            )
            for b in boxes:
                await b.kill()
        warm = Series("create from a warm sandbox until exec works")
        mgr = SandboxManager(options=options, settings=settings.model_copy(update={"warm_pool_size": 1}))
        async with mgr:
            await (await mgr.create("base")).kill()  # starts the warm pool
            for _ in range(n):
                await _warm_ready(mgr)
                t0 = time.perf_counter()
                sbx = await mgr.create("base")
                await sbx.commands.run(["true"])
                warm.samples.append(time.perf_counter() - t0)
                await sbx.kill()
    disk_series = Series("disk allocated per sandbox right after create", disk)
    return [
        BenchTable(
            "Sandboxes: create, pause and resume (256 MiB busybox base template, QEMU engine)",
            [cold, build, create, warm, pause, resume, later],
            baseline=cold.label,
            notes=[
                "warm pool: sandboxes restored ahead of time and paused; create resumes one, reseeds, "
                "sets the clock and hostname and applies its network policy",
                "each sandbox: own network namespace slot, qcow2/reflink/sparse copy-on-write disk, "
                "post-restore RNG reseed + clock + hostname before 'ready'",
            ],
        ),
        BenchTable(
            "Sandbox density and disk",
            [pss_series, rss_series, uss_series, resumed_pss, resumed_uss, disk_series],
            unit="MiB",
            notes=[
                f"measured {IDLE_S:.0f}s after the sandboxes were created, and again after a pause + resume",
                "Pss splits the template's memory file between the sandboxes mapping it; private memory "
                "(Private_Clean + Private_Dirty) is what one more sandbox costs",
            ],
        ),
    ]
