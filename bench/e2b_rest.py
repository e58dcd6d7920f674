"""The cost of the E2B REST face: the official e2b SDK creating a sandbox, running ``true`` in it and
asking for its info through ``smartvm serve``'s app (uvicorn on a loopback port, in this process),
against the same calls through smartvm's own API: its native REST API (``/v1``, an httpx client with
a kept-alive connection) on the same server, and the in-process SandboxManager behind that app.

All paths share one manager, one data dir and one warm pool, and calls are timed in turns. SDK minus
``/v1`` is the compatibility layer (the E2B routes and envd face, the access token, the SDK's own
client code); SDK minus in-process adds what any HTTP API costs (loopback HTTP, JSON, the key check).
Creates are measured with a warm pool of one (the service's default; every create first waits,
untimed, until it holds a sandbox again) and without one (a full restore per create). The pool's
next restore starts 0.1 s after a create (warm.REFILL_DELAY_S), after both calls have returned.
``commands.run("true")`` runs ``/bin/bash -l -c true`` as ``user`` on both paths.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from bench.common import BenchTable, Series
from bench.guests import engine_facts, private_root
from smartvm.options import SmartVMOptions
from smartvm.sandbox.manager import SandboxManager
from smartvm.sandbox.settings import SandboxSettings

MiB = 1 << 20
TESTS = str(Path(__file__).resolve().parents[1] / "tests")
Timed = Callable[[], Awaitable[object]]


async def _warm_ready(mgr: SandboxManager) -> None:
    for _ in range(2400):
        if mgr._warm.ids() or mgr.settings.warm_pool_size == 0:
            return
        await asyncio.sleep(0.05)


def _v1_kill(http: httpx.AsyncClient, sandbox_id: str) -> Timed:
    async def kill() -> None:
        (await http.delete(f"/v1/sandboxes/{sandbox_id}")).raise_for_status()

    return kill


async def _turns(cases: list[tuple[Series, Timed]], n: int, before: Timed | None = None) -> None:
    """Time the cases in turns (a, b, a, b, ...): a slow phase of the shared machine hits both alike."""
    for _ in range(n):
        for row, fn in cases:
            if before is not None:
                await before()
            t0 = time.perf_counter()
            await fn()
            row.samples.append(time.perf_counter() - t0)


async def _measure(warm: int, n: int, everything: bool) -> tuple[list[BenchTable], str]:
    sys.path.insert(0, TESTS)  # the uvicorn runner of the envd tests
    from e2b import AsyncSandbox

    from e2b_support import serve
    from smartvm.service.context import ServiceContext
    from smartvm.service.e2b.rest import service_app
    from smartvm.service.keys import KeyStore
    from smartvm.service.manager_backend import ManagerBackend

    tables = []
    with private_root() as root:
        data = root / "data"
        options = SmartVMOptions(engine="qemu", runtime_dir=root / "run")
        mgr = SandboxManager(options=options, settings=SandboxSettings(data_dir=data, warm_pool_size=warm))
        with KeyStore(data) as keys:
            key = keys.create("bench")[0]
        ctx = ServiceContext(data_dir=data, backend=ManagerBackend(mgr))
        # the app's lifespan starts and closes the manager; the /v1 client is closed also on a failure
        async with (
            serve(service_app(ctx)) as url,
            httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=600.0) as http,
        ):
            await (await mgr.create("base")).kill()  # builds the template (untimed)
            conn = {"api_url": url, "sandbox_url": url, "api_key": key}
            made: list[Callable[[], Awaitable[object]]] = []

            async def native_create() -> None:
                made.append((await mgr.create("base")).kill)

            async def v1_create() -> None:
                res = (await http.post("/v1/sandboxes", json={"template": "base"})).raise_for_status()
                made.append(_v1_kill(http, res.json()["id"]))

            async def sdk_create() -> None:
                made.append((await AsyncSandbox.create(**conn)).kill)

            async def ready() -> None:
                while made:
                    await made.pop()()
                await _warm_ready(mgr)

            pool = f"warm pool of {warm}" if warm else "no warm pool"
            create = [
                Series(f"manager.create('base'), {pool}"),
                Series(f"POST /v1/sandboxes, {pool}"),
                Series(f"SDK Sandbox.create(), {pool}"),
            ]
            calls = (native_create, v1_create, sdk_create)
            for call in calls:  # untimed: each client's first call sets up its connection and imports
                await ready()
                await call()
            await _turns(list(zip(create, calls, strict=True)), n, before=ready)
            await ready()
            tables.append(BenchTable(f"create, {pool}", create, baseline=create[1].label))

            sbx = await mgr.create("base")
            accel = (await engine_facts(await sbx.running_vm()))[1]
            if everything:
                remote = await AsyncSandbox.connect(sbx.id, **conn)
                one = f"/v1/sandboxes/{sbx.id}"

                async def v1_exec() -> None:
                    (await http.post(f"{one}/exec", json={"cmd": "true"})).raise_for_status()

                async def v1_info() -> None:
                    (await http.get(one)).raise_for_status()

                run = [
                    Series("sandbox.commands.run('true')"),
                    Series("POST /v1/.../exec {'cmd': 'true'}"),
                    Series("SDK commands.run('true')"),
                ]
                await _turns(
                    [
                        (run[0], lambda: sbx.commands.run("true")),
                        (run[1], v1_exec),
                        (run[2], lambda: remote.commands.run("true")),
                    ],
                    3 * n,
                )
                data = os.urandom(10 * MiB)
                path = "/home/user/bench.bin"

                async def native_io() -> None:
                    await sbx.files.write(path, data)
                    assert await sbx.files.read(path) == data

                async def v1_io() -> None:
                    (
                        await http.put(f"{one}/files/content", params={"path": path}, content=data)
                    ).raise_for_status()
                    got = (await http.get(f"{one}/files/content", params={"path": path})).raise_for_status()
                    assert got.content == data

                async def sdk_io() -> None:
                    await remote.files.write(path, data)
                    assert await remote.files.read(path, format="bytes") == data

                io = [
                    Series("sandbox.files.write + read, 10 MiB"),
                    Series("PUT + GET /v1/.../files/content, 10 MiB"),
                    Series("SDK files.write + read, 10 MiB"),
                ]
                await _turns(list(zip(io, (native_io, v1_io, sdk_io), strict=True)), max(3, n // 2))
                for row in io:
                    row.extra["throughput"] = f"{20 / row.median:.1f} MiB/s"
                info = [Series("sandbox.info()"), Series("GET /v1/sandboxes/{id}"), Series("SDK get_info()")]
                await _turns([(info[0], sbx.info), (info[1], v1_info), (info[2], remote.get_info)], 3 * n)
                tables += [
                    BenchTable("commands.run('true') on a running sandbox", run, baseline=run[1].label),
                    BenchTable("10 MiB file write + read back", io, baseline=io[1].label),
                    BenchTable("sandbox info", info, baseline=info[1].label),
                ]
            await sbx.kill()
    return tables, accel


async def run(quick: bool) -> list[BenchTable]:
    n = 8 if quick else 20
    warm_tables, accel = await _measure(1, n, everything=True)
    cold_tables, _ = await _measure(0, max(3, n // 4), everything=False)
    tables = [*warm_tables[:1], *cold_tables, *warm_tables[1:]]
    for t in tables:
        t.title = f"E2B SDK vs smartvm's own API (/v1, in process), one server: {t.title} (QEMU, {accel})"
    tables[0].notes.append("the SDK, the service and the manager share this process (and the 2 cores)")
    return tables
