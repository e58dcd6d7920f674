"""Sandboxes restored ahead of time, so that ``create`` only has to hand one out.

A warm sandbox is restored from its template into a ready network slot with its own
copy-on-write disk, answers its agent once (which also loads into the emulator everything the
agent's first requests run), and is then paused (the hypervisor's vCPUs stopped: it costs no CPU,
and its memory is the template's shared pages plus what the warm-up touched). ``create`` resumes it,
gives it fresh randomness, the host's clock and its own network policy, and records it: a few
agent round trips instead of a restore.

Warm sandboxes are not recorded: if the manager's process dies, the next manager (or any smartvm
command) sweeps them like any VM whose owner is gone. They are dropped when their template changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartvm.sandbox.settings import DEFAULT_USER

if TYPE_CHECKING:
    from smartvm.sandbox.manager import _Live

log = logging.getLogger(__name__)

#: how long a refill waits before it starts restoring: the create that took a warm sandbox answers
#: its caller first (a service's response is still being written, read and parsed) without a new
#: hypervisor starting on the same cores and event loop meanwhile
REFILL_DELAY_S = 0.1


@dataclass
class WarmSandbox:
    sid: str
    snapshot_dir: Path  # the template snapshot it came from (a rebuilt template makes it stale)
    live: _Live


@dataclass
class WarmPool:
    """Up to ``size`` warm sandboxes per template, refilled in the background after each take."""

    size: int
    make: Callable[[str], Awaitable[WarmSandbox | None]]  # template name -> a new warm sandbox
    discard: Callable[[WarmSandbox], Coroutine[Any, Any, None]]
    _ready: dict[str, list[WarmSandbox]] = field(default_factory=dict)
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _discarding: set[asyncio.Task[None]] = field(default_factory=set)  # kept: the loop holds tasks weakly
    closed: bool = False

    def ids(self) -> set[str]:
        return {w.sid for ws in self._ready.values() for w in ws}

    def take(self, template: str, snapshot_dir: Path) -> WarmSandbox | None:
        """A warm sandbox of ``template`` restored from ``snapshot_dir`` (stale ones are dropped)."""
        ready = self._ready.get(template, [])
        while ready:
            warm = ready.pop(0)
            if warm.snapshot_dir == snapshot_dir:
                return warm
            task = asyncio.get_running_loop().create_task(self.discard(warm))
            self._discarding.add(task)
            task.add_done_callback(self._discarding.discard)
        return None

    def refill(self, template: str) -> None:
        """Start making warm sandboxes of ``template`` until there are ``size`` of them, after
        :data:`REFILL_DELAY_S`."""
        if self.closed or self.size <= 0:
            return
        task = self._tasks.get(template)
        if task is None or task.done():
            self._tasks[template] = asyncio.get_running_loop().create_task(
                self._fill(template), name=f"smartvm-warm-{template}"
            )

    async def _fill(self, template: str) -> None:
        await asyncio.sleep(REFILL_DELAY_S)
        while not self.closed and len(self._ready.get(template, [])) < self.size:
            try:
                warm = await self.make(template)
            except Exception as exc:  # a refill in the background: the next create restores instead
                log.warning("warming a sandbox of template %s failed: %s", template, exc)
                return
            if warm is None:  # no room on the host now
                return
            if self.closed:
                await self.discard(warm)
                return
            self._ready.setdefault(template, []).append(warm)

    async def drop(self, template: str) -> None:
        """Stop refilling ``template`` and end its warm sandboxes (it is being deleted)."""
        task = self._tasks.pop(template, None)
        if task is not None:
            await _cancelled(task)
        for warm in self._ready.pop(template, []):
            await self.discard(warm)

    async def close(self) -> None:
        """Stop refilling and end every warm sandbox."""
        self.closed = True
        for task in self._tasks.values():
            await _cancelled(task)
        warm = [w for ws in self._ready.values() for w in ws]
        self._ready.clear()
        for w in warm:
            await self.discard(w)
        if self._discarding:
            await asyncio.gather(*self._discarding, return_exceptions=True)


async def _cancelled(task: asyncio.Task[None]) -> None:
    """Cancel a refill and wait until it has stopped (it unwinds what it was making); its failure
    is logged, never raised: ending the pool must not fail because a background refill did."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception as exc:
        log.warning("a warm sandbox refill failed: %s", exc)


async def run_once_and_park(live: _Live) -> None:
    """One request of the kind a user's first command makes, then stop the vCPUs."""
    await live.vm.exec(["true"], user=DEFAULT_USER)
    await live.vm.pause()
