"""The warm pool's refill schedule: a create's caller gets its answer before the next restore starts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

from smartvm.sandbox.warm import REFILL_DELAY_S, WarmPool, WarmSandbox


def _warm(sid: str) -> WarmSandbox:
    return WarmSandbox(sid, Path("/snapshots/base"), cast(Any, None))  # the pool never looks at live


async def test_refill_starts_restoring_only_after_the_delay_and_fills_the_pool() -> None:
    made_at: list[float] = []
    discarded: list[str] = []

    async def make(template: str) -> WarmSandbox:
        made_at.append(time.monotonic())
        return _warm(f"sb-{len(made_at):08x}")

    async def discard(warm: WarmSandbox) -> None:
        discarded.append(warm.sid)

    pool = WarmPool(2, make, discard)
    asked = time.monotonic()
    pool.refill("base")
    for _ in range(5):  # a service answering its create: a few loop turns and a thread hop
        await asyncio.sleep(0)
    await asyncio.to_thread(lambda: None)
    if time.monotonic() - asked < REFILL_DELAY_S / 2:  # not checkable on a machine that slow
        assert made_at == []
    async with asyncio.timeout(30):
        await pool._tasks["base"]  # the fill ends once the pool is full
    assert len(pool.ids()) == 2
    assert made_at[0] - asked >= REFILL_DELAY_S - 0.01
    assert pool.take("base", Path("/snapshots/base")) is not None
    await pool.close()
    assert len(discarded) == 1 and not pool.ids()


async def test_close_during_the_delay_makes_nothing() -> None:
    made: list[str] = []

    async def make(template: str) -> WarmSandbox:
        made.append(template)
        return _warm("sb-00000001")

    async def discard(warm: WarmSandbox) -> None:
        raise AssertionError("nothing was made, so nothing is discarded")

    pool = WarmPool(1, make, discard)
    pool.refill("base")
    await pool.close()
    await asyncio.sleep(REFILL_DELAY_S * 2)
    assert made == [] and not pool.ids()


async def test_a_failing_refill_never_fails_close() -> None:
    """A template deleted under a refill makes its restore fail with whatever error (here the
    disk image gone): the refill stops and logs it, and ending the pool still succeeds."""

    async def make(template: str) -> WarmSandbox:
        raise FileNotFoundError(2, "No such file or directory", "/templates/gone/disk.img")

    async def discard(warm: WarmSandbox) -> None:
        raise AssertionError("nothing was made, so nothing is discarded")

    pool = WarmPool(1, make, discard)
    pool.refill("gone")
    async with asyncio.timeout(30):
        await pool._tasks["gone"]  # ended, not failed
    await pool.close()


async def test_drop_stops_the_refill_and_ends_the_warm_sandboxes_of_a_template() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    discarded: list[str] = []
    made: dict[str, int] = {}

    async def make(template: str) -> WarmSandbox:
        made[template] = made.get(template, 0) + 1
        if template == "snap" and made[template] == 2:  # in progress when the template goes
            started.set()
            await release.wait()
        return _warm(f"sb-{template}{made[template]}")

    async def discard(warm: WarmSandbox) -> None:
        discarded.append(warm.sid)

    pool = WarmPool(2, make, discard)
    pool.refill("snap")
    pool.refill("base")
    async with asyncio.timeout(30):
        await started.wait()
        await pool.drop("snap")
        release.set()
        await pool._tasks["base"]
    assert "snap" not in pool._tasks and sorted(pool.ids()) == ["sb-base1", "sb-base2"]
    assert discarded == ["sb-snap1"]  # the ready one; the one being made was cancelled with its refill
    await pool.close()
