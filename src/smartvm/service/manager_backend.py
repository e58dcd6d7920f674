"""The service's backend over one :class:`~smartvm.sandbox.manager.SandboxManager`.

Most calls pass straight through (a ``Sandbox`` already is a :class:`SandboxHandle`). What the API
adds is translated here, not in routes: a sandbox's shape comes from its template (a restored
snapshot cannot change cpus or memory), so ``cpus``/``memory_mib`` in a create are checked against
it; templates are built by name from the default guest; capacity is read for ``/metrics``.
"""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.nat import EgressPolicy
from smartvm.options import SmartVMOptions
from smartvm.sandbox.manager import Capacity, SandboxManager
from smartvm.sandbox.settings import SandboxSettings
from smartvm.sandbox.store import EventRecord, SandboxState, TemplateRecord
from smartvm.sandbox.templates import base_template_spec
from smartvm.service.backend import OnExit, SandboxHandle, SandboxInfoLike, SnapshotInfoLike, TemplateBuild


def _shape_mismatch(template: str, cpus: int, memory_mib: int) -> SmartVMError:
    return SmartVMError(
        ErrorCode.INVALID_ARGUMENT,
        f"template {template!r} makes sandboxes with {cpus} cpus and {memory_mib} MiB (a sandbox is "
        "restored from its template's snapshot): leave cpus/memory_mib out, or build a template with "
        "that shape (POST /v1/templates) and create from it",
    )


class ManagerBackend:
    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager

    @classmethod
    def open(
        cls,
        data_dir: Path,
        on_exit: OnExit = "keep",
        *,
        engine: str = "auto",
        runtime_dir: Path | None = None,
        **settings: object,
    ) -> ManagerBackend:
        opts: dict[str, object] = {"engine": engine}
        if runtime_dir is not None:
            opts["runtime_dir"] = runtime_dir
        values = {"data_dir": data_dir, "on_close": on_exit, **settings}
        return cls(
            SandboxManager(
                options=SmartVMOptions.model_validate(opts), settings=SandboxSettings.model_validate(values)
            )
        )

    async def start(self) -> None:
        await self.manager.start()

    async def close(self) -> None:
        await self.manager.close()

    async def _template_shape(self, name: str) -> tuple[int, int] | None:
        found = [t for t in await self.manager.list_templates() if t.name == name]
        return (found[0].cpus, found[0].memory_mib) if found else None

    async def create(
        self,
        template: str,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        envs: Mapping[str, str] | None = None,
        auto_pause: bool = False,
        cpus: int | None = None,
        memory_mib: int | None = None,
        internet: bool = True,
        egress: EgressPolicy | None = None,
    ) -> SandboxHandle:
        def fits(shape: tuple[int, int]) -> bool:
            return (cpus is None or cpus == shape[0]) and (memory_mib is None or memory_mib == shape[1])

        shape = await self._template_shape(template) if cpus or memory_mib else None
        if shape is not None and not fits(shape):
            raise _shape_mismatch(template, *shape)
        sbx = await self.manager.create(
            template,
            timeout=timeout,
            metadata=metadata,
            envs=envs,
            auto_pause=auto_pause,
            internet=internet,
            egress=egress,
        )
        if cpus is None and memory_mib is None:
            return sbx
        info = await sbx.info()
        if not fits((info.cpus, info.memory_mib)):  # a template first built by this create
            await sbx.kill()
            raise _shape_mismatch(template, info.cpus, info.memory_mib)
        return sbx

    async def get(self, sandbox_id: str) -> SandboxHandle:
        return await self.manager.get(sandbox_id)

    async def list(
        self, *, states: Sequence[SandboxState] | None = None, metadata: Mapping[str, str] | None = None
    ) -> builtins.list[SandboxHandle]:
        found = await self.manager.list(states=None if states is None else list(states), metadata=metadata)
        return list(found)

    async def infos(
        self, *, states: Sequence[SandboxState] | None = None, metadata: Mapping[str, str] | None = None
    ) -> builtins.list[SandboxInfoLike]:
        found = await self.manager.infos(states=None if states is None else list(states), metadata=metadata)
        return list(found)

    async def count_by_state(self) -> dict[str, int]:
        store = self.manager.store
        return await store.call(store.count_by_state)

    async def events(self, sandbox_id: str) -> builtins.list[EventRecord]:
        await self.manager.get(sandbox_id)  # SANDBOX_NOT_FOUND for an unknown id
        return await self.manager.events(sandbox_id)

    async def list_snapshots(self) -> builtins.list[SnapshotInfoLike]:
        return list(await self.manager.list_snapshots())

    async def delete_snapshot(self, name: str) -> None:
        await self.manager.delete_snapshot(name)

    async def list_templates(self) -> builtins.list[TemplateRecord]:
        return await self.manager.list_templates()

    async def build_template(self, build: TemplateBuild) -> TemplateRecord:
        spec = await base_template_spec(build.cpus, build.memory_mib)
        spec = dataclasses.replace(
            spec,
            name=build.name,
            env=dict(build.envs or {}),
            start_command=build.start_command,
            ready_command=build.ready_command,
        )
        return await self.manager.build_template(spec)

    def capacity(self) -> Capacity:
        return self.manager.capacity()
