"""A handle on one sandbox: its id and state, its commands and files, and its lifecycle calls.

The handle holds no resources: every call goes through the manager, which knows whether the
sandbox runs (and on which VM), is paused to disk or is gone. Handles from ``create``, ``get`` and
``list`` of one manager are interchangeable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from smartvm.host.nat import EgressPolicy
from smartvm.sandbox.commands import Commands
from smartvm.sandbox.files import SandboxFiles
from smartvm.sandbox.store import SandboxRecord, SandboxState

if TYPE_CHECKING:
    from smartvm.errors import SmartVMError
    from smartvm.sandbox.manager import SandboxManager, SnapshotInfo
    from smartvm.vm import MicroVM


@dataclass(frozen=True)
class SandboxInfo:
    """What ``sandbox.info()`` reports. Times are Unix seconds; disk use is allocated bytes."""

    id: str
    template: str
    state: SandboxState
    metadata: Mapping[str, str]
    envs: Mapping[str, str]
    cpus: int
    memory_mib: int
    created_at: float
    end_at: float
    auto_pause: bool
    disk_bytes: int
    error: str | None
    host_ip: str | None  # the address the host reaches the guest at (None while not running)
    egress: EgressPolicy = field(default_factory=EgressPolicy.allow_all)  # what it may connect to


@dataclass(frozen=True)
class SandboxMetrics:
    """Resource use of a running sandbox's hypervisor (CPU since start, resident memory) and disk."""

    cpu_seconds: float
    cpu_count: int
    memory_rss_bytes: int
    memory_mib: int
    disk_bytes: int
    timestamp: float


class Sandbox:
    """One sandbox of a :class:`~smartvm.sandbox.manager.SandboxManager`."""

    def __init__(self, manager: SandboxManager, sandbox_id: str) -> None:
        self._manager = manager
        self.id = sandbox_id
        self._last: SandboxRecord | None = None
        self.commands = Commands(self.running_vm, lambda: self.envs)
        self.files = SandboxFiles(self.running_vm)

    def _record(self) -> SandboxRecord:
        # the manager may have let go of a long-stopped record: the last one seen is still true
        found = self._manager._recs.get(self.id)
        if found is not None:
            self._last = found
        elif self._last is None:
            self._last = self._manager._record(self.id)
        return self._last

    @property
    def state(self) -> SandboxState:
        """The state as of the manager's last change (no I/O)."""
        return self._record().state

    @property
    def template(self) -> str:
        return self._record().template

    @property
    def metadata(self) -> Mapping[str, str]:
        return self._record().metadata

    @property
    def envs(self) -> Mapping[str, str]:
        """The environment every command gets: the template's plus the create's ``envs``."""
        return self._record().envs

    async def running_vm(self) -> MicroVM:
        """The VM of the running sandbox, for faces that speak to its agent directly (the E2B envd
        face); SANDBOX_NOT_RUNNING (saying why) when it is paused, stopped or failed. No I/O."""
        return await self._manager._running_vm(self.id)

    async def info(self) -> SandboxInfo:
        return await self._manager._info(self.id)

    async def metrics(self) -> SandboxMetrics:
        return await self._manager._metrics(self.id)

    async def pause(self) -> None:
        """Save memory and processes to disk and free the VM; SANDBOX_ALREADY_PAUSED if paused."""
        await self._manager.pause(self.id)

    async def resume(self, *, timeout: float | None = None) -> None:
        """Bring a paused sandbox back (memory, processes and files as they were); its end time
        becomes now + ``timeout`` (default: the manager's). SANDBOX_NOT_PAUSED if it runs."""
        await self._manager.resume(self.id, timeout=timeout)

    async def set_timeout(self, seconds: float) -> None:
        """End the sandbox ``seconds`` from now (killed, or paused with ``auto_pause``)."""
        await self._manager.set_timeout(self.id, seconds)

    async def set_egress(self, policy: EgressPolicy) -> None:
        """Replace what the sandbox may connect to (at once; a paused one gets it at resume)."""
        await self._manager.set_egress(self.id, policy)

    async def fork(self, count: int = 1, *, timeout: float | None = None) -> list[Sandbox | SmartVMError]:
        """``count`` new sandboxes that continue from this moment of this one (see ``manager.fork``)."""
        return await self._manager.fork(self.id, count, timeout=timeout)

    async def snapshot(self, name: str) -> SnapshotInfo:
        """A named snapshot that new sandboxes can be created from (``manager.create(name)``)."""
        return await self._manager.snapshot(self.id, name)

    async def kill(self) -> None:
        """Destroy the sandbox and everything it holds (idempotent)."""
        await self._manager.kill(self.id)

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r}, state={self.state.value!r})"
