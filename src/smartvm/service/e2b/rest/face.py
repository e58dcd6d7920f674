"""What the E2B faces of one service share: sandboxes as E2B sees them, their envd access tokens, the
resolver of the envd face, and the figures E2B reports that smartvm does not keep (CPU percent,
disk size).

E2B knows two states, running and paused; a stopped sandbox does not exist for it and neither does
a failed one (its only way forward is a kill, which the face still accepts).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.settings import DEFAULT_USER
from smartvm.sandbox.store import SandboxState
from smartvm.sandbox.templates import DISK_FILE
from smartvm.service.backend import SandboxHandle, SandboxMetricsLike
from smartvm.service.context import ServiceContext
from smartvm.service.e2b.app import EnvdApp
from smartvm.service.e2b.binding import EnvdBinding
from smartvm.service.e2b.rest.tokens import AccessTokens
from smartvm.service.models import SANDBOX_ID_PATTERN

S = SandboxState
_SANDBOX_ID = re.compile(SANDBOX_ID_PATTERN)
MIB = 1 << 20
PRUNE_INTERVAL_S = 600.0


class E2BFace:
    """State of the E2B REST and envd faces of one service (reached by routes as ``app.state.e2b``)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.tokens = AccessTokens(ctx.data_dir)
        self.envd: EnvdApp | None = None  # set by the app that mounts the envd face
        self._cpu_seen: dict[str, tuple[float, float]] = {}  # sandbox -> (time, CPU seconds)
        self._next_prune = 0.0  # time.monotonic() of the next prune of stale tokens

    async def sandbox(self, sandbox_id: str, *, failed_ok: bool = False) -> SandboxHandle:
        """The sandbox ``sandbox_id`` if it exists for E2B: SANDBOX_NOT_FOUND for an id of the wrong
        shape, an unknown or stopped sandbox, and a failed one unless ``failed_ok``."""
        if not _SANDBOX_ID.match(sandbox_id):
            raise SmartVMError(
                ErrorCode.SANDBOX_NOT_FOUND, f"no sandbox {sandbox_id[:40]!r}: ids look like sb-1a2b3c4d"
            )
        sbx = await self.ctx.backend.get(sandbox_id)
        if sbx.state is S.STOPPED:
            raise SmartVMError(ErrorCode.SANDBOX_NOT_FOUND, f"sandbox {sandbox_id} was killed")
        if sbx.state is S.ERROR and not failed_ok:
            error = (await sbx.info()).error
            raise SmartVMError(
                ErrorCode.SANDBOX_NOT_FOUND,
                f"sandbox {sandbox_id} failed ({error}): kill it to free what it holds",
            )
        return sbx

    async def token(self, sandbox_id: str, *, new: bool = False) -> str:
        """The sandbox's envd access token (a new one with ``new``); stored before it is told."""
        known = None if new else self.tokens.get(sandbox_id)
        if known is not None:
            return known
        if time.monotonic() >= self._next_prune:
            await self.prune()
        return self.tokens.issue(sandbox_id, replace=new)  # ~20 µs (no fsync): less than a thread hop

    async def prune(self) -> None:
        """Drop what the faces hold for sandboxes that ended without this face seeing it (timed out,
        killed over /v1): tokens, ended watchers, CPU samples; done with the first token issued
        after a start and then every PRUNE_INTERVAL_S."""
        self._next_prune = time.monotonic() + PRUNE_INTERVAL_S
        listed_at = time.time()
        alive = {s.id for s in await self.ctx.backend.list(states=[s for s in S if s is not S.STOPPED])}
        self._cpu_seen = {sid: seen for sid, seen in self._cpu_seen.items() if sid in alive}
        if self.envd is not None:
            self.envd.filesystem.drop_ended(alive)
        await asyncio.to_thread(self.tokens.keep_only, alive, listed_at)

    async def forget(self, sandbox_id: str, *, gone: bool) -> None:
        """Drop what the faces hold for a sandbox that stopped running (and its token if ``gone``)."""
        self._cpu_seen.pop(sandbox_id, None)
        if self.envd is not None:
            await self.envd.filesystem.forget(sandbox_id)
        if gone:
            self.tokens.drop(sandbox_id)  # one row, no fsync: less than a thread hop, as in token()

    async def resolve(self, sandbox_id: str) -> EnvdBinding | None:
        """The envd face's resolver: a running sandbox's agent, token, default user and envs."""
        try:
            sbx = await self.sandbox(sandbox_id)
        except SmartVMError as exc:
            if exc.code is ErrorCode.SANDBOX_NOT_FOUND:
                return None
            raise
        try:
            vm = await sbx.running_vm()
        except SmartVMError as exc:
            if exc.code is not ErrorCode.SANDBOX_NOT_RUNNING:
                raise
            # the SDK reads "was not found" in a 502 as "the sandbox is not running"
            raise SmartVMError(
                ErrorCode.SANDBOX_NOT_RUNNING,
                f"The sandbox {sandbox_id} was not found running: it is {sbx.state.value} "
                "(Sandbox.connect() resumes a paused sandbox)",
            ) from None
        return EnvdBinding(await self.token(sandbox_id), vm, default_user=DEFAULT_USER, env=sbx.envs)

    def cpu_percent(self, sandbox_id: str, m: SandboxMetricsLike, started_at: float) -> float:
        """CPU use since the last sample of this sandbox (the first: since it started), in percent
        of its vCPUs."""
        then, cpu_then = self._cpu_seen.get(sandbox_id, (started_at, 0.0))
        self._cpu_seen[sandbox_id] = (m.timestamp, m.cpu_seconds)
        elapsed = m.timestamp - then
        if elapsed <= 0 or m.cpu_seconds < cpu_then:  # a resume starts a new hypervisor
            return 0.0
        return round(min(100.0, 100.0 * (m.cpu_seconds - cpu_then) / (elapsed * max(1, m.cpu_count))), 2)

    async def disk_sizes_mib(self) -> dict[str, int]:
        """Template name -> size of its root disk in MiB (what a sandbox of it starts with)."""
        sizes = {}
        for t in await self.ctx.backend.list_templates():
            if t.snapshot_dir:
                disk = Path(t.snapshot_dir).parent / DISK_FILE
                try:
                    sizes[t.name] = (await asyncio.to_thread(os.stat, disk)).st_size // MIB
                except OSError:
                    continue
        return sizes

    def close(self) -> None:
        self.tokens.close()
