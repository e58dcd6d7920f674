"""A read-only backend over the sandbox state store, for a build without ``SandboxManager``.

It lists and shows what the data dir's SQLite store records (sandboxes, events, snapshots,
templates) and answers every change with SERVICE_UNAVAILABLE (503), so ``smartvm serve``, its keys,
errors, metrics and the page run end to end before the manager is there. It holds the data dir's
manager lock like a manager would, so it never runs beside one. Replaced by the manager adapter as
soon as ``smartvm.sandbox.manager`` exists (see :func:`smartvm.service.context.open_backend`).
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.store import (
    ManagerLock,
    SandboxRecord,
    SandboxState,
    SandboxStore,
    TemplateRecord,
    acquire_manager_lock,
)
from smartvm.service.backend import (
    Capacity,
    SandboxCommands,
    SandboxFiles,
    SandboxHandle,
    SnapshotInfoLike,
    TemplateBuild,
)


def _unavailable(what: str) -> NoReturn:
    raise SmartVMError(
        ErrorCode.SERVICE_UNAVAILABLE,
        f"{what} needs the sandbox manager, which this smartvm build does not have: upgrade smartvm",
    )


@dataclass(frozen=True)
class _Info:
    id: str
    template: str
    state: SandboxState
    metadata: Mapping[str, str]
    cpus: int
    memory_mib: int
    created_at: float
    end_at: float
    auto_pause: bool
    disk_bytes: int
    error: str | None


@dataclass(frozen=True)
class _Snapshot:
    name: str
    source_sandbox: str | None
    created_at: float
    size_bytes: int


class _RecordHandle:
    """A sandbox known only by its record: it can be shown, not changed."""

    def __init__(self, rec: SandboxRecord) -> None:
        self._rec = rec
        self.id = rec.id

    @property
    def commands(self) -> SandboxCommands:
        _unavailable("running commands")

    @property
    def files(self) -> SandboxFiles:
        _unavailable("guest files")

    async def info(self) -> _Info:
        names = {f.name for f in fields(_Info)} - {"disk_bytes"}
        return _Info(**{n: getattr(self._rec, n) for n in names}, disk_bytes=0)

    async def metrics(self) -> Any:
        _unavailable("sandbox metrics")

    async def pause(self) -> None:
        _unavailable("pause")

    async def resume(self, *, timeout: float | None = None) -> None:
        _unavailable("resume")

    async def set_timeout(self, seconds: float) -> None:
        _unavailable("set_timeout")

    async def snapshot(self, name: str) -> SnapshotInfoLike:
        _unavailable("snapshots")

    async def kill(self) -> None:
        _unavailable("kill")


class StoreBackend:
    """The read-only backend (see the module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._store: SandboxStore | None = None
        self._lock: ManagerLock | None = None

    @property
    def store(self) -> SandboxStore:
        if self._store is None:
            raise SmartVMError(ErrorCode.SERVICE_UNAVAILABLE, "the service is starting or stopping: retry")
        return self._store

    async def start(self) -> None:
        if self._store is None:
            self._lock = acquire_manager_lock(self.data_dir)
            try:
                self._store = SandboxStore(self.data_dir)
            except BaseException:
                self._lock.release()
                raise

    async def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def create(self, template: str, **kwargs: Any) -> SandboxHandle:
        _unavailable("creating a sandbox")

    async def get(self, sandbox_id: str) -> SandboxHandle:
        return _RecordHandle(await self.store.call(self.store.get_sandbox, sandbox_id))

    async def list(
        self, *, states: Sequence[SandboxState] | None = None, metadata: Mapping[str, str] | None = None
    ) -> builtins.list[SandboxHandle]:
        wanted = states if states is not None else [s for s in SandboxState if s is not SandboxState.STOPPED]
        recs = await self.store.call(self.store.list_sandboxes, states=wanted, metadata=metadata)
        return [_RecordHandle(r) for r in recs]

    async def events(self, sandbox_id: str) -> builtins.list[dict[str, Any]]:
        await self.store.call(self.store.get_sandbox, sandbox_id)
        return [
            {"sandbox_id": e.sandbox_id, "time": e.time, "kind": e.kind, "detail": e.detail}
            for e in await self.store.call(self.store.events, sandbox_id)
        ]

    async def list_snapshots(self) -> builtins.list[SnapshotInfoLike]:
        recs = await self.store.call(self.store.list_snapshots)
        return [_Snapshot(r.name, r.source_sandbox, r.created_at, r.size_bytes) for r in recs]

    async def delete_snapshot(self, name: str) -> None:
        _unavailable("deleting a snapshot")

    async def list_templates(self) -> builtins.list[TemplateRecord]:
        return await self.store.call(self.store.list_templates)

    async def build_template(self, build: TemplateBuild) -> TemplateRecord:
        _unavailable("building a template")

    async def capacity(self) -> Capacity:
        return Capacity(sandboxes_left=0, memory_mib_left=0)
