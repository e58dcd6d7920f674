"""The cost of the E2B REST face: the official e2b SDK creating a sandbox and running ``true`` in it
through ``smartvm serve``'s app (uvicorn on a loopback port, in this process) against the same
operations on the in-process SandboxManager behind that app (QEMU engine).

Both paths share one manager, one data dir and one warm pool (one sandbox restored ahead, the
service's default), and every create waits (untimed) until the warm pool holds a sandbox again,
so the difference is the compatibility layer: HTTP, JSON, the API key check, the access token,
the SDK itself. ``commands.run("true")`` runs ``/bin/bash -l -c true`` as ``user`` on both paths.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.common import BenchTable, Series
from bench.guests import engine_facts, private_root
from smartvm.options import SmartVMOptions
from smartvm.sandbox.manager import SandboxManager
from smartvm.sandbox.settings import SandboxSettings

TESTS = str(Path(__file__).resolve().parents[1] / "tests")
Kill = Callable[[], Awaitable[object]]


async def _warm_ready(mgr: SandboxManager) -> None:
    for _ in range(2400):
        if mgr._warm.ids():
            return
        await asyncio.sleep(0.05)


async def run(quick: bool) -> list[BenchTable]:
    sys.path.insert(0, TESTS)  # the uvicorn runner of the envd tests
    from e2b import AsyncSandbox

    from e2b_support import serve
    from smartvm.service.context import ServiceContext
    from smartvm.service.e2b.rest import service_app
    from smartvm.service.keys import KeyStore
    from smartvm.service.manager_backend import ManagerBackend

    n = 5 if quick else 20
    labels = {
        ("manager", "create"): "manager.create('base')",
        ("SDK", "create"): "SDK Sandbox.create()",
        ("manager", "run"): "sandbox.commands.run('true')",
        ("SDK", "run"): "SDK commands.run('true')",
        ("manager", "both"): "manager: create + run('true')",
        ("SDK", "both"): "SDK: create + run('true')",
    }
    rows = {k: Series(label) for k, label in labels.items()}
    accel = "?"
    with private_root() as root:
        data = root / "data"
        options = SmartVMOptions(engine="qemu", runtime_dir=root / "run")
        mgr = SandboxManager(options=options, settings=SandboxSettings(data_dir=data, warm_pool_size=1))
        with KeyStore(data) as keys:
            key = keys.create("bench")[0]
        ctx = ServiceContext(data_dir=data, backend=ManagerBackend(mgr))
        async with serve(service_app(ctx)) as url:  # its lifespan starts and closes the manager
            await (await mgr.create("base")).kill()  # builds the template (untimed)
            conn = {"api_url": url, "sandbox_url": url, "api_key": key}

            async def native() -> tuple[float, float, Kill]:
                t0 = time.perf_counter()
                sbx = await mgr.create("base")
                t1 = time.perf_counter()
                assert (await sbx.commands.run("true")).exit_code == 0
                return t1 - t0, time.perf_counter() - t1, sbx.kill

            async def sdk() -> tuple[float, float, Kill]:
                t0 = time.perf_counter()
                sbx = await AsyncSandbox.create(**conn)
                t1 = time.perf_counter()
                assert (await sbx.commands.run("true")).exit_code == 0
                return t1 - t0, time.perf_counter() - t1, sbx.kill

            for _ in range(n):  # in turns: a slow phase of the shared machine hits both alike
                for path, case in (("manager", native), ("SDK", sdk)):
                    await _warm_ready(mgr)
                    create, cmd, kill = await case()
                    rows[path, "create"].samples.append(create)
                    rows[path, "run"].samples.append(cmd)
                    rows[path, "both"].samples.append(create + cmd)
                    await kill()

            # more samples of a command alone, on one running sandbox
            sbx = await mgr.create("base")
            accel = (await engine_facts(await sbx.running_vm()))[1]
            remote = await AsyncSandbox.connect(sbx.id, **conn)
            for _ in range(2 * n):
                for path, target in (("manager", sbx), ("SDK", remote)):
                    t0 = time.perf_counter()
                    await target.commands.run("true")
                    rows[path, "run"].samples.append(time.perf_counter() - t0)
            await sbx.kill()
    note = "one warm sandbox restored ahead; the SDK, the service and the manager share this process"
    tables = []
    for what, title in (
        ("create", "create"),
        ("run", "commands.run('true')"),
        ("both", "create + run('true')"),
    ):
        pair = [rows["manager", what], rows["SDK", what]]
        tables.append(
            BenchTable(
                f"E2B SDK through smartvm serve vs the in-process manager: {title} (QEMU, {accel})",
                pair,
                baseline=pair[0].label,
                notes=[note] if what == "create" else [],
            )
        )
    return tables
