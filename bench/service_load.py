"""Benchmark 10: the service under load (QEMU engine, 256 MiB busybox ``base`` template, TCG here).

Rounds of create → exec (``true``) → kill, per operation, in process with :class:`SandboxManager`
and through a real ``smartvm serve`` on loopback, both with the same settings (SandboxSettings'
defaults, each on its own fresh data dir, both running). The API's overhead is the difference of
the medians, measured where it can be seen on a shared 2-core machine: rounds one at a time,
alternating between the two sides so both see the same load, each create taking a warm sandbox
(the pools are refilled between rounds, outside the timing); and exec on an already running sandbox,
alternating too. Then the load phase: all rounds at once (at most ``in_flight`` of them), in process
first and right after through the API, with the errors counted. Last, a service with
``--max-sandboxes 2`` is full and gets a burst of creates: each must be refused with 429 at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench.common import BenchTable, Series
from bench.guests import guest, private_root
from smartvm.errors import SmartVMError
from smartvm.options import SmartVMOptions
from smartvm.sandbox.manager import SandboxManager
from smartvm.sandbox.settings import SandboxSettings
from smartvm.service.keys import KeyStore

OPS = ("create", "exec", "kill")
MAX_SANDBOXES = 64  # above the load phase's rounds: the limit is not what is measured there
FULL_LIMIT = 2  # the capacity phase's --max-sandboxes
SANDBOX_TIMEOUT_S = 600.0

Round = Callable[[], Awaitable[dict[str, float]]]
Timings = dict[str, tuple[float, float]]  # by operation: (sum, count) of seconds


class Tally:
    """Per-operation samples of one side and phase, plus the errors by code."""

    def __init__(self, side: str) -> None:
        self.side = side
        self.samples: dict[str, list[float]] = {op: [] for op in OPS}
        self.errors: collections.Counter[str] = collections.Counter()
        self.extra: dict[str, dict[str, str]] = {}  # more columns of an operation's row

    async def run(self, one_round: Round, rounds: int, in_flight: int) -> None:
        gate = asyncio.Semaphore(in_flight)

        async def guarded() -> None:
            async with gate:
                try:
                    for op, seconds in (await one_round()).items():
                        self.samples[op].append(seconds)
                except SmartVMError as exc:
                    self.errors[exc.code.value] += 1
                except (httpx.HTTPError, OSError) as exc:
                    self.errors[type(exc).__name__] += 1

        await asyncio.gather(*(guarded() for _ in range(rounds)))

    def series(self, op: str) -> Series:
        return Series(f"{op}, {self.side}", self.samples[op], dict(self.extra.get(op, {})))


async def _timed(what: Awaitable[Any], into: dict[str, float], op: str) -> Any:
    t0 = time.perf_counter()
    result = await what
    into[op] = time.perf_counter() - t0
    return result


# --- in process -------------------------------------------------------------------------------------
def _manager(data: Path, run: Path) -> SandboxManager:
    return SandboxManager(
        options=SmartVMOptions(engine="qemu", runtime_dir=run),
        settings=SandboxSettings(data_dir=data, max_sandboxes=MAX_SANDBOXES),
    )


def _in_process_round(mgr: SandboxManager) -> Round:
    async def one() -> dict[str, float]:
        took: dict[str, float] = {}
        sbx = await _timed(mgr.create("base", timeout=SANDBOX_TIMEOUT_S), took, "create")
        try:
            await _timed(sbx.commands.run(["true"]), took, "exec")
        finally:
            await _timed(sbx.kill(), took, "kill")
        return took

    return one


# --- through the API --------------------------------------------------------------------------------
def _api_error(res: httpx.Response) -> SmartVMError:
    from smartvm.service.client import error_of

    return error_of(res)


def _api_round(http: httpx.AsyncClient) -> Round:
    async def one() -> dict[str, float]:
        took: dict[str, float] = {}
        res = await _timed(http.post("/v1/sandboxes", json={"timeout": SANDBOX_TIMEOUT_S}), took, "create")
        if res.status_code != 201:
            raise _api_error(res)
        sid = res.json()["id"]
        try:
            ran = await _timed(http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]}), took, "exec")
            if ran.status_code != 200 or ran.json()["exit_code"] != 0:
                raise _api_error(ran)
        finally:
            gone = await _timed(http.delete(f"/v1/sandboxes/{sid}"), took, "kill")
        if gone.status_code != 204:
            raise _api_error(gone)
        return took

    return one


@contextlib.asynccontextmanager
async def _serving(data: Path, run: Path, log: Path, *args: str) -> AsyncIterator[str]:
    """``smartvm serve`` on a free loopback port; its URL. Stopped with SIGTERM (killed if it hangs)."""
    cmd = [sys.executable, "-m", "smartvm.cli", "serve", "--engine", "qemu", "--port", "0"]
    cmd += ["--data-dir", str(data), "--runtime-dir", str(run), *args]
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    try:
        url = ""
        async with asyncio.timeout(120):
            while not url.startswith("http://"):
                line = await proc.stdout.readline()
                if not line:
                    tail = (await asyncio.to_thread(log.read_text))[-1500:]
                    raise RuntimeError(f"smartvm serve exited before it was ready: {tail}")
                url = line.decode().strip()
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(60):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _client(url: str, key: str, in_flight: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        headers={"X-API-Key": key},
        timeout=httpx.Timeout(600.0, connect=30.0),
        limits=httpx.Limits(max_connections=in_flight + 4, max_keepalive_connections=in_flight + 4),
    )


async def _over_capacity(url: str, key: str, burst: int) -> tuple[Series, collections.Counter[str]]:
    """Fill a ``--max-sandboxes FULL_LIMIT`` service, then send ``burst`` creates at once: the
    latency of each answer, and the answers by status and code."""
    refused = Series(f"create on a full service ({burst} at once)")
    answers: collections.Counter[str] = collections.Counter()
    async with _client(url, key, burst) as http:
        held = []
        for _ in range(FULL_LIMIT):
            res = await http.post("/v1/sandboxes", json={"timeout": SANDBOX_TIMEOUT_S})
            if res.status_code != 201:
                raise _api_error(res)
            held.append(res.json()["id"])

        async def create() -> None:
            t0 = time.perf_counter()
            res = await http.post("/v1/sandboxes", json={"timeout": SANDBOX_TIMEOUT_S})
            refused.samples.append(time.perf_counter() - t0)
            code = res.json().get("code", "") if res.status_code >= 400 else ""
            answers[f"{res.status_code} {code}".strip()] += 1
            if res.status_code == 201:
                held.append(res.json()["id"])

        try:
            await asyncio.gather(*(create() for _ in range(burst)))
        finally:
            for sid in held:
                await http.delete(f"/v1/sandboxes/{sid}")
    return refused, answers


# --- the benchmark ----------------------------------------------------------------------------------
def _overhead(inproc: Series, api: Series) -> str:
    if not inproc.samples or not api.samples:
        return ""
    return f"{(api.median - inproc.median) * 1e3:+.1f} ms"


def _table(title: str, inproc: Tally, api: Tally, notes: list[str], ops: tuple[str, ...] = OPS) -> BenchTable:
    rows: list[Series] = []
    for op in ops:
        a, b = inproc.series(op), api.series(op)
        b.extra["API overhead vs in process (median)"] = _overhead(a, b)
        rows += [a, b]
    errors = {side.side: sum(side.errors.values()) for side in (inproc, api)}
    detail = {side.side: dict(side.errors) for side in (inproc, api)}
    notes = [*notes, f"errors: {errors} {detail if any(errors.values()) else ''}".rstrip()]
    return BenchTable(title, [s for s in rows if s.samples], notes=notes)


async def _service_seconds(http: httpx.AsyncClient) -> Timings:
    """(sum, count) of the service's own timing of each operation (its /metrics histogram)."""
    text = (await http.get("/metrics")).text
    found = re.findall(r'^smartvm_operation_seconds_(sum|count)\{operation="(\w+)"\} (\S+)$', text, re.M)
    values = {(kind, op): float(v) for kind, op, v in found}
    return {op: (values.get(("sum", op), 0.0), values.get(("count", op), 0.0)) for op in OPS}


def _inside_the_service(api: Tally, before: Timings, after: Timings) -> None:
    """Add to each API row the service's own mean time of the operation, and what the API added
    to it on average (the client's mean minus the service's: HTTP, the key check, routing, JSON)."""
    for op in OPS:
        total, count = after[op][0] - before[op][0], after[op][1] - before[op][1]
        samples = api.samples[op]
        if count and samples:
            inside = total / count
            added = statistics.fmean(samples) - inside
            api.extra[op] = {
                "service's own time (mean)": f"{inside * 1e3:.1f} ms",
                "API overhead vs service's own (mean)": f"{added * 1e3:+.1f} ms",
            }


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(1200):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not happen within a minute")


async def _api_warm(http: httpx.AsyncClient) -> bool:
    text = (await http.get("/metrics")).text
    return any(
        line.startswith("smartvm_sandboxes_warm ") and float(line.split()[1]) >= 1
        for line in text.splitlines()
    )


async def _in_process_warm(mgr: SandboxManager) -> bool:
    return mgr.capacity().warm >= 1


async def _steady_exec(mgr: SandboxManager, http: httpx.AsyncClient, n: int) -> tuple[Tally, Tally]:
    """``exec true`` on one running sandbox per side, n times each, alternating."""
    inproc, api = Tally("in process"), Tally("API")
    sbx = await mgr.create("base", timeout=SANDBOX_TIMEOUT_S)
    res = await http.post("/v1/sandboxes", json={"timeout": SANDBOX_TIMEOUT_S})
    if res.status_code != 201:
        raise _api_error(res)
    sid = res.json()["id"]
    try:

        async def local() -> dict[str, float]:
            took: dict[str, float] = {}
            await _timed(sbx.commands.run(["true"]), took, "exec")
            return took

        async def remote() -> dict[str, float]:
            took: dict[str, float] = {}
            ran = await _timed(http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]}), took, "exec")
            if ran.status_code != 200:
                raise _api_error(ran)
            return took

        await inproc.run(local, 2, 1)  # the first requests after a restore are slower: not measured
        await Tally("warm-up").run(remote, 2, 1)
        for i in range(n):
            for side, fn in ((inproc, local), (api, remote))[:: 1 if i % 2 else -1]:
                await side.run(fn, 1, 1)
        inproc.samples["exec"] = inproc.samples["exec"][2:]
    finally:
        await sbx.kill()
        await http.delete(f"/v1/sandboxes/{sid}")
    return inproc, api


async def run(quick: bool) -> list[BenchTable]:
    guest(memory_mib=256)  # skips when QEMU or the guest image is missing
    sequential = 4 if quick else 20
    steady = 10 if quick else 40
    in_flight = 10 if quick else 50
    burst = 10 if quick else 20
    seq = {side: Tally(side) for side in ("in process", "API")}
    load = {side: Tally(side) for side in ("in process", "API")}
    with private_root() as root:
        run_dir, log = root / "run", root / "serve.log"
        local_data, api_data = root / "local", root / "api"
        with KeyStore(api_data) as keys:
            key = keys.create("bench")[0]
        limit = ("--max-sandboxes", str(MAX_SANDBOXES))
        async with (
            _manager(local_data, run_dir) as mgr,
            _serving(api_data, run_dir, log, *limit) as url,
            _client(url, key, in_flight) as http,
        ):
            local, remote = _in_process_round(mgr), _api_round(http)
            # first creates build each side's template and start its warm pool: not measured
            await Tally("warm-up").run(local, 1, 1)
            await Tally("warm-up").run(remote, 1, 1)
            sides = (
                (seq["in process"], local, lambda: _in_process_warm(mgr), "the manager's warm sandbox"),
                (seq["API"], remote, lambda: _api_warm(http), "the service's warm sandbox"),
            )
            for i in range(sequential):
                for tally, one_round, warm, what in sides[:: 1 if i % 2 else -1]:
                    await _until(warm, what)  # each create takes a warm sandbox: not bimodal
                    await tally.run(one_round, 1, 1)
            steady_inproc, steady_api = await _steady_exec(mgr, http, steady)
            await load["in process"].run(local, in_flight, in_flight)
            before = await _service_seconds(http)
            await load["API"].run(remote, in_flight, in_flight)
            _inside_the_service(load["API"], before, await _service_seconds(http))
        async with _serving(api_data, run_dir, log, "--max-sandboxes", str(FULL_LIMIT)) as url:
            refused, answers = await _over_capacity(url, key, burst)
        leftovers = [p.name for d in (local_data, api_data) for p in (d / "sandboxes").iterdir()]
    cpus = len(os.sched_getaffinity(0))
    settings = (
        f"SandboxSettings defaults (warm pool 1, max_sandboxes {MAX_SANDBOXES}) on both sides; {cpus} cores"
    )
    return [
        _table(
            f"Service: create → exec → kill, {sequential} rounds one at a time (QEMU, 256 MiB base)",
            seq["in process"],
            seq["API"],
            [
                settings,
                "alternating in process / API; each create takes a warm sandbox (refilled between rounds)",
                "exec: POST .../exec {'cmd': ['true']} vs sbx.commands.run(['true']) right after the create",
            ],
        ),
        _table(
            f"Service: exec `true` on a running sandbox, {steady} times each",
            steady_inproc,
            steady_api,
            ["alternating in process / API, after 2 unmeasured execs per side"],
            ops=("exec",),
        ),
        _table(
            f"Service under load: {in_flight} create → exec → kill rounds at once",
            load["in process"],
            load["API"],
            [f"all {in_flight} rounds in flight together, in process and right after through the API"],
        ),
        BenchTable(
            f"A full service (--max-sandboxes {FULL_LIMIT}) refuses creates at once",
            [refused],
            notes=[
                f"answers: {dict(answers)}",
                f"sandbox dirs left in the data dirs: {leftovers or 'none'}",
            ],
        ),
    ]
