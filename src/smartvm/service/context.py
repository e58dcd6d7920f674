"""Everything one running service holds: the sandbox backend, the key store, metrics and limits.

The context is opened once (keys, then the backend, which reconciles sandbox state) before the
server accepts connections, and closed once after the last request; both are idempotent so that an
ASGI lifespan and ``smartvm serve`` can share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from smartvm.service.backend import OnExit, SandboxBackend
from smartvm.service.keys import KeyStore
from smartvm.service.metrics import ServiceMetrics

MIB = 1 << 20


@dataclass(frozen=True)
class ServiceLimits:
    """Request size limits: JSON bodies are small, file uploads are streamed and may be large."""

    max_json_bytes: int = 1 * MIB
    max_upload_bytes: int = 1024 * MIB
    max_exec_stdin_bytes: int = 1 * MIB


def open_backend(
    data_dir: Path,
    on_exit: OnExit = "keep",
    *,
    engine: str = "auto",
    runtime_dir: Path | None = None,
    **settings: object,
) -> SandboxBackend:
    """The sandbox backend of the service: one SandboxManager on ``data_dir`` (not started yet)."""
    from smartvm.service.manager_backend import ManagerBackend

    return ManagerBackend.open(data_dir, on_exit, engine=engine, runtime_dir=runtime_dir, **settings)


@dataclass
class ServiceContext:
    data_dir: Path
    backend: SandboxBackend
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    keys: KeyStore | None = None
    ready: bool = False

    @property
    def key_store(self) -> KeyStore:
        if self.keys is None:
            from smartvm.errors import ErrorCode, SmartVMError

            raise SmartVMError(ErrorCode.SERVICE_UNAVAILABLE, "the service is starting or stopping: retry")
        return self.keys

    async def open(self) -> None:
        if self.ready:
            return
        if self.keys is None:
            self.keys = KeyStore(self.data_dir)
        await self.backend.start()
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        try:
            await self.backend.close()
        finally:
            if self.keys is not None:
                self.keys.close()
                self.keys = None
